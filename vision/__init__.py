"""Vision side of the stack: ParameterNet CNNs in timm's registry and a DeepSpeed image-classification trainer.

`import vision` registers `parameternet_600m`, `parameternet_300m`, `parameternet_tiny` and their static twins
`ghostnet_600m`, `ghostnet_300m`, `ghostnet_tiny`, so `timm.create_model(name, num_classes=..., in_chans=...)` builds
them.
"""

from vision.models import MODEL_NAMES, STATIC_TWINS, DynamicConv, ParameterNet

__all__ = ["DynamicConv", "MODEL_NAMES", "ParameterNet", "STATIC_TWINS"]
