"""The LGG recipe with the scanner-domain augmentation at moderate strength (issue #47).

Skull-stripped slices, other fields of view and pixel sizes, bias fields, intensity
windows and thick-slice blur (resunet_jax/augment.py), on top of configs/resunet.py.
The shipped networks were fine-tuned from the recipe's with it (pretrained/resunet_lgg/
README.md has the commands).
"""

from configs import resunet


def get_config():
    config = resunet.get_config()
    config.augment.skull_strip = 0.25
    config.augment.fov = 0.75
    config.augment.bias_field = 0.3
    config.augment.blur = 0.2
    config.augment.window = 0.1
    return config
