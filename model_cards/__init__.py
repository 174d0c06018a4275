"""Model cards filled from recorded facts, and Hub push (cvlm card, cvlm push)."""
