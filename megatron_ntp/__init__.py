"""megatron-ntp: pre-training with a generalized (shaped) next-token loss on megatron-core."""

from megatron_ntp.console import quiet_known_warnings

quiet_known_warnings()
