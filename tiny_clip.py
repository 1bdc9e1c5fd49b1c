"""Builds a tiny CLIP checkpoint offline: no weights and no tokenizer are downloaded.

The folder it writes is an ordinary CLIP checkpoint (config, safetensors weights, tokenizer, image processor), so it goes
through exactly the code a real checkpoint such as `openai/clip-vit-base-patch32` does:

    python tiny_clip.py OUT_DIR --texts kb_and_train_texts.txt
    model = OTMELModel.from_clip(OUT_DIR)

The tokenizer is a byte-pair encoding trained on the given texts (give it KB and training text only, never evaluation
text), lower-cased and split on whitespace and punctuation, wrapped as a fast tokenizer with CLIP's start / end tokens.
"""

import argparse
import os

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>", "[SEP]"]


def build_tokenizer(texts, vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on `texts` (an iterable of strings)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        sep_token="[SEP]",
        model_max_length=77,
    )


def build_tiny_clip(
    output_dir: str,
    texts,
    vocab_size: int = 4000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    image_size: int = 64,
    patch_size: int = 16,
    projection_dim: int = 64,
    seed: int = 0,
) -> str:
    """Writes a randomly initialised tiny CLIP, its tokenizer and image processor to `output_dir`; returns the path.

    Defaults: hidden 64, 2 layers, 64-px images in 16-px patches (17 visual tokens), projection 64.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("build_tiny_clip needs some text to train its tokenizer on")
    tokenizer = build_tokenizer(texts, vocab_size)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<pad>", "<|startoftext|>", "<|endoftext|>")}
    layer = dict(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
    )
    config = CLIPConfig(
        # Explicit special ids: CLIP pools the text at the first end token, and its default id (49407) is absent here.
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<|startoftext|>"],
            eos_token_id=ids["<|endoftext|>"],
            **layer,
        ),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **layer),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument(
        "--texts", required=True, help="text file, one training text per line (KB and training text only)"
    )
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.texts, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f]
    print(build_tiny_clip(args.output_dir, texts, vocab_size=args.vocab_size, seed=args.seed))


if __name__ == "__main__":
    main()
