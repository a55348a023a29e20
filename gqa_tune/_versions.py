"""The dependency versions gqa_tune is tested on: the single owner of each range.

``pyproject.toml`` declares the same ranges; ``tests/test_dependency_contracts.py``
checks that the two agree and that the installed versions fall inside them, and
it fails loudly when an internal we rely on moves. A range is widened only after
the tests pass on its new ends (``.ci/run`` tests the lower end of transformers').

Internals of each dependency that gqa_tune touches (each has a contract test):

- torch: ``torch.nn.attention.flex_attention.BlockMask`` fields and constructors
  (``gqa_tune/ops/masks.py``).
- torchtune: ``torchtune.config._utils._merge_yaml_and_cli_args``
  (``gqa_tune/config_check.py``), ``torchtune.config._utils._get_component_from_path``
  (``recipes/uptrain.py``), ``torchtune.models.llama3_1._position_embeddings.Llama3ScaledRoPE``
  (``gqa_tune/models/_component_builders.py``).
- transformers: T5's dispatch through ``AttentionInterface`` / ``AttentionMaskInterface``
  (``gqa_tune/convert/t5.py``).
"""

from importlib import metadata
from typing import Dict, Optional

from packaging.specifiers import SpecifierSet

#: distribution name -> PEP 440 specifier, exactly as in pyproject.toml.
#: transformers: 5.15 is the first release whose T5Attention dispatches through
#: ``ALL_ATTENTION_FUNCTIONS`` (passing the relative position bias as ``position_bias``);
#: 5.24 is the newest tested.
SUPPORTED: Dict[str, str] = {
    "torch": ">=2.11,<2.14",
    "torchtune": "==0.6.1",
    "torchao": ">=0.14,<0.16",
    "transformers": ">=5.15,<5.25",
}


class UnsupportedVersionError(RuntimeError):
    """An installed dependency is outside the range gqa_tune supports."""


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution``, or ``None`` if it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def is_supported(distribution: str, version: str) -> bool:
    """Whether ``version`` of ``distribution`` lies in :data:`SUPPORTED` (pre-releases and local builds count)."""
    return SpecifierSet(SUPPORTED[distribution]).contains(version, prereleases=True)


def lowest_supported(distribution: str) -> str:
    """The lower end of :data:`SUPPORTED`'s range for ``distribution`` (its ``>=`` or ``==`` version)."""
    ends = [spec.version for spec in SpecifierSet(SUPPORTED[distribution]) if spec.operator in (">=", "==")]
    if len(ends) != 1:
        raise ValueError(f"{distribution}{SUPPORTED[distribution]} has no single lower end")
    return ends[0]


def require(distribution: str, version: Optional[str] = None, *, feature: str = "gqa_tune") -> None:
    """Raise :class:`UnsupportedVersionError` unless ``distribution`` (at ``version``, default: installed) is supported.

    The message names the installed version and the supported range; it never
    assumes which way the user has to move.
    """
    if distribution not in SUPPORTED:
        raise ValueError(f"no supported range is declared for {distribution!r}; known: {', '.join(SUPPORTED)}")
    version = installed_version(distribution) if version is None else version
    spec = SUPPORTED[distribution]
    if version is None:
        raise UnsupportedVersionError(f"{feature} needs {distribution}{spec}, which is not installed")
    if not is_supported(distribution, version):
        raise UnsupportedVersionError(
            f"{feature} supports {distribution}{spec} (the range it is tested on); found {distribution} {version}. "
            f"Install a supported version: pip install '{distribution}{spec}'"
        )
