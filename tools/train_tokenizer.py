"""Train a sentencepiece BPE tokenizer from JSONL. See megatron_ntp/data/train_tokenizer.py.

Example:
    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix tok/spm --vocab-size 8000
"""

import sys

if __name__ == "__main__":
    from megatron_ntp.data.train_tokenizer import main

    sys.exit(main())
