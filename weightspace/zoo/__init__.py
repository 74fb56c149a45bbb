"""weightspace.zoo: reference models, embedded digits data and small training loops.

>>> from weightspace import zoo                                     # doctest: +SKIP
>>> model = zoo.make("resnet20", width=2, norm="layer", seed=0)      # doctest: +SKIP
>>> train_loader, test_loader = zoo.digits_loaders(flat=False)        # doctest: +SKIP
>>> result = zoo.train(model, train_loader, epochs=10, lr=1e-3, eval_data=test_loader)  # doctest: +SKIP
"""
from weightspace.zoo.data import TASKS, digits_loaders, load_digits, parse_classes
from weightspace.zoo.models import (MLP, MODELS, VGG, Activation, BasicBlock, ResNet20, TinyViT, ViTBlock,
                                    example_inputs, make)
from weightspace.zoo.train import EpochRecord, TrainResult, evaluate, train
# generated zoos and INRs, user zoos
from weightspace.zoo.zoos import DigitsCNN, ModelZoo, ZooError, digits_cnn_zoo
from weightspace.zoo.inr import digits_inrs
from weightspace.zoo.loaders import load_zoo, save_zoo

__all__ = [
    "MLP", "VGG", "ResNet20", "TinyViT", "Activation", "BasicBlock", "ViTBlock", "MODELS", "make",
    "example_inputs", "load_digits", "digits_loaders", "parse_classes", "TASKS", "train", "evaluate",
    "TrainResult", "EpochRecord",
    "DigitsCNN", "ModelZoo", "ZooError", "digits_cnn_zoo", "digits_inrs", "load_zoo", "save_zoo",
]
