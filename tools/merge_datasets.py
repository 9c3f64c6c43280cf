"""Merge megatron-core indexed datasets (Megatron-LM's tool of the same name), or the shards of
a sharded tools/preprocess_data.py run. See megatron_ntp/data/shards.py.

Examples:
    python tools/merge_datasets.py --input data/parts --output-prefix data/all_text_document
    python tools/merge_datasets.py --shards 16 --output-prefix data/corpus
"""

import sys
import warnings

if __name__ == "__main__":
    # megatron-core warns at import about Transformer Engine/Apex, irrelevant here.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl).*")
    from megatron_ntp.data.shards import merge_main

    sys.exit(merge_main())
