"""What the model knows about text, without torch: prompt formats, chat grouping, exact ids.

The gateway imports this package (to count prompt tokens with the model's own tokenizer) and so
does the backend (to encode prompts); it must never import torch, sentencepiece or anything of
`gateway/` or `providers/` (tests/test_architecture.py checks the first, the import contract in
`.importlinter` the second).

    prompt_format.py   OpenAI chat -> segments (text or control ids) for Vicuna and Mistral v3
    chat_messages.py   the message grouping both formats share
    spm_tokenizer.py   SentencePiece-exact ids from a committed tokenizer.json (`tokenizers` only)
    tokenizer_data/    v1 (WizardLM-2) and v3 (Mixtral-8x22B-Instruct) tokenizer.json files,
                       made by scripts/make_tokenizer_json.py from mistral-common's files
"""

from pathlib import Path

TOKENIZER_DATA_DIR = Path(__file__).with_name("tokenizer_data")
TOKENIZER_FILES = {"v1": "v1.tokenizer.json", "v3": "v3.tokenizer.json"}
