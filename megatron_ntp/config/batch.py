"""The batch arithmetic of a run, in one place: the global batch (given in tokens) split into
sequences, and those into micro-batches per data-parallel rank."""


class BatchLayout:
    """Global batch of a config (parallel.data resolved) in sequences and micro-batches.

    One *round* is one micro-batch on every data-parallel rank; the global batch must be a whole
    number of rounds (validate_config checks it), and a step runs `num_microbatches` rounds.
    """

    def __init__(self, config):
        t, p = config.train, config.parallel
        self.seq_length = config.data.seq_length
        self.micro_batch_size = t.micro_batch_size
        self.data_parallel = p.data
        self.global_tokens = t.global_batch_tokens
        self.global_sequences = t.global_batch_tokens // self.seq_length
        self.tokens_per_round = t.micro_batch_size * self.seq_length * p.data
        self.num_microbatches = (t.global_batch_tokens // self.tokens_per_round
                                 if self.tokens_per_round > 0 else 0)
