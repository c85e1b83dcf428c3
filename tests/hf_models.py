"""Tiny Hugging Face models built and saved here, so that the pretrained-model code runs without the hub."""

from pathlib import Path

END = "<|endoftext|>"


def tiny_gpt2(folder, text: str, *, vocab_size: int = 300, layers: int = 2, width: int = 32, heads: int = 2,
              context: int = 128, seed: int = 0) -> Path:
    """A GPT-2 with random weights and a byte-level BPE tokenizer trained on ``text``, written to ``folder``
    with ``save_pretrained`` (what a user downloads from the hub has the same files)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END], show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END, eos_token=END, unk_token=None)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = Path(folder)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
