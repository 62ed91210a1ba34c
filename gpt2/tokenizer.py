"""GPT-2's byte-level BPE tokenizer. (Stub: being written.)"""


class Tokenizer:
    pass
