"""``none``: vanilla LLaVA-NeXT, every visual token kept (the reference every method is compared to)."""

from compressors.base import Compressor
from compressors.registry import register_compressor


@register_compressor("none")
class NoCompression(Compressor):
    """Keeps all tokens with transformers' packing; ``ratio`` must be 1.0 (a sweep's ratios do not apply)."""

    fixed_ratio = 1.0

    def __init__(self, ratio: float = 1.0) -> None:
        super().__init__(ratio)
        if self.ratio != 1.0:
            raise ValueError(
                f"compressor 'none' keeps every token, so compressor.ratio must be 1.0 (got {self.ratio}); "
                "sweep ratios over a compressing method, e.g. compressor=random,pooling"
            )
