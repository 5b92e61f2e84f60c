"""The tutorial's data set, importable under the original name: `from tutorial_dataset import MyDataset`.

The code lives in `cldm.data.dataset` and `cldm.data.layouts`; `python tutorial_dataset_test.py` prints one item.
"""
from cldm.data.dataset import MyDataset
from cldm.data.layouts import REQUIRED_KEYS, read_prompt_file

__all__ = ["REQUIRED_KEYS", "MyDataset", "read_prompt_file"]
