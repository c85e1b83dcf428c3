"""Tiny Hugging Face models built and saved here, so that the pretrained-model code runs without the hub."""

from pathlib import Path

END = "<|endoftext|>"


def tiny_gpt2(folder, text: str, *, vocab_size: int = 300, layers: int = 2, width: int = 32, heads: int = 2,
              context: int = 128, seed: int = 0, dropout: float = 0.1) -> Path:
    """A GPT-2 with random weights and a byte-level BPE tokenizer trained on ``text``, written to ``folder``
    with ``save_pretrained`` (what a user downloads from the hub has the same files); ``dropout`` is each of
    GPT-2's (0.1 is its default)."""
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
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    folder = Path(folder)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bert(folder, text: str, *, decoder: bool = False, width: int = 32, seed: int = 0) -> Path:
    """A BERT with random weights (an encoder; with ``decoder``, BERT made causal by ``is_decoder``) and a
    word-level tokenizer trained on ``text``, written to ``folder`` with ``save_pretrained``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    special = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=special, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * width, max_position_embeddings=128, is_decoder=decoder)
    folder = Path(folder)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
