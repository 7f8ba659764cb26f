"""The token tests need Hugging Face `tokenizers` (the [hf] extra); fixtures live in tests/conftest.py."""

import pytest

pytest.importorskip("tokenizers")
