"""A tiny TFDS text dataset for tests: `keel_tiny_text`, 240 stdlib source files (200 train,
40 validation), prepared as array_record the way `tfds build` prepares one."""

import tensorflow_datasets as tfds

from keel_jax.data import sources

NAME = "keel_tiny_text"


class KeelTinyText(tfds.core.GeneratorBasedBuilder):
  """Defined once per process: TFDS registers a builder class by name when it is defined."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    files = sources.pycode_files()[:240]
    return {
      "train": self._generate_examples(files[:200]),
      "validation": self._generate_examples(files[200:]),
    }

  def _generate_examples(self, files):
    for key, text in files:
      yield key, {"text": text}


def build(data_dir: str) -> None:
  """Prepares the dataset under `data_dir` (local or gs://)."""
  KeelTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
