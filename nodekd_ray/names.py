"""Display names: how models and data sets are written in tables (report.py, audit.py). One table."""
MODEL_NAMES = {"resnet20": "ResNet20", "resnet32": "ResNet32", "resnet44": "ResNet44", "resnet56": "ResNet56",
               "resnet110": "ResNet110"}
DATASET_NAMES = {"cifar10": "CIFAR10", "svhn": "SVHN", "digits": "digits", "synthetic": "synthetic"}
