"""Tokenize JSONL into megatron-core indexed datasets. See megatron_ntp/data/preprocess.py.

Example:
    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok/spm.model \
        --append-eod --workers 8
"""

import sys
import warnings

if __name__ == "__main__":
    # megatron-core warns at import about Transformer Engine/Apex, irrelevant to preprocessing.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl).*")
    from megatron_ntp.data.preprocess import main

    sys.exit(main())
