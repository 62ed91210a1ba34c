"""Hugging Face-format checkpoints. (Stub: being written.)"""


def load_model(name_or_path, model_class, *, device="cpu", dtype=None):
    raise NotImplementedError


def save_model(model, directory, *, tokenizer=None):
    raise NotImplementedError
