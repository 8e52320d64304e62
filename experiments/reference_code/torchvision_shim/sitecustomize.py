"""Only for a CPU torch with a CUDA build of torchvision (PyPI's torchvision wheel on a machine
whose torch is +cpu): torchvision's compiled ops cannot load, and its import fails registering
fake kernels for `torchvision::nms` and `::qnms`. Declaring the two schemas lets it import; the
reference never calls them. run.sh puts this on PYTHONPATH only when `import torchvision` fails.
"""
import torch.library

_LIBRARY = torch.library.Library('torchvision', 'DEF')
_LIBRARY.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
_LIBRARY.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
