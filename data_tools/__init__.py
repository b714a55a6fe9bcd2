"""Write and check webdataset shards in the layout mm-ptft reads (see docs/data.md).

Run ``python -m data_tools --help`` for the command line.
"""

from data_tools.captions import WriteOptions, WriteResult, write_caption_file, write_folder
from data_tools.cli import main
from data_tools.fashion_mnist import write_fashion_mnist
from data_tools.shards import DataToolsError
from data_tools.verify import BadSample, VerifyReport, print_report, verify_dataset

__all__ = [
    "BadSample",
    "DataToolsError",
    "VerifyReport",
    "WriteOptions",
    "WriteResult",
    "main",
    "print_report",
    "verify_dataset",
    "write_caption_file",
    "write_fashion_mnist",
    "write_folder",
]
