"""The reference trainer: a ResNet18 YOLOv3-style detector for PASCAL VOC, exact to resume.

`python -m trainer` runs one attempt under the supervisor's protocol (or alone with `--params`);
`python -m trainer.synth` writes a VOCdevkit-shaped data set of drawn shapes. See docs/trainer.md.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
