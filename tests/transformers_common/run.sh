#!/usr/bin/env bash
# transformers' own common model tests (ModelTesterMixin and ConfigTester, the checks its own models
# pass) against every connector of the family, with the installed transformers version. Run from the
# project's environment: bash tests/transformers_common/run.sh [CONNECTOR ...]
#
# The tests ship in transformers' source distribution (not its wheel), fetched from the package index.
# That distribution lacks tests/generation/test_utils.py and tests/exporters/ and the tests/utils module
# the config tests import from: the two mixins are replaced by empty classes (so GenerationTesterMixin is
# not run) and the config tests get their table of non-default config values.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(python -c "import transformers; print(transformers.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip install -q parameterized  # test_modeling_common imports it
python -m pip download -q --no-deps --no-binary :all: --no-build-isolation "transformers==$version" -d "$work" ||
  python -m pip download -q --no-deps --no-binary :all: "transformers==$version" -d "$work"
tar -xzf "$work/transformers-$version.tar.gz" -C "$work"
tests="$work/transformers-$version/tests"
mkdir -p "$tests/generation" "$tests/exporters" "$tests/utils" "$tests/models/connector_vlm"
for package in "" generation exporters utils models models/connector_vlm; do touch "$tests/$package/__init__.py"; done
[ -f "$tests/generation/test_utils.py" ] || echo "class GenerationTesterMixin: pass" > "$tests/generation/test_utils.py"
[ -f "$tests/exporters/test_export.py" ] || echo "class ExportTesterMixin: pass" > "$tests/exporters/test_export.py"
[ -f "$tests/utils/test_configuration_utils.py" ] || cat > "$tests/utils/test_configuration_utils.py" <<'PY'
# a non-default value for each common config field, which ConfigTester sets and reads back
config_common_kwargs = {"return_dict": False, "output_hidden_states": True, "output_attentions": True,
                        "dtype": "float16", "chunk_size_feed_forward": 5, "architectures": ["BertModel"],
                        "id2label": {0: "label"}, "label2id": {"label": "0"}, "problem_type": "regression"}
PY
cp "$here/connector_vlm_tester.py" "$tests/models/connector_vlm/test_modeling_connector_vlm.py"
connectors=${*:-$(python -c "from cvlm.modeling import CONNECTORS; print(' '.join(CONNECTORS))")}
failed=()
for connector in $connectors; do
  echo "== transformers $version common model tests, connector $connector"
  (cd "$work/transformers-$version" && CVLM_CONNECTOR=$connector python -m pytest -q -p no:cacheprovider \
      -W ignore::pytest.PytestCollectionWarning tests/models/connector_vlm) | tail -n 3 || failed+=("$connector")
done
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
echo "transformers' common model tests passed for: $connectors"
