"""A tiny TFDS text dataset for tests: `keel_tiny_text`, 240 stdlib source files (200 train,
40 validation), prepared as array_record the way `tfds build` prepares one."""

import tensorflow_datasets as tfds

from keel_jax.data import sources

NAME = "keel_tiny_text"


def build(data_dir: str) -> None:
  """A small text dataset (stdlib sources) prepared as array_record, as `tfds build` would."""

  class KeelTinyText(tfds.core.GeneratorBasedBuilder):
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

  KeelTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
