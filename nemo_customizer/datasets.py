"""``nemo_customizer.datasets``: upload (validate, report, store), list, show and delete datasets by name.

    from nemo_customizer import datasets
    print(datasets.upload("data/", name="support-v1"))   # the report: formats, rows, token lengths, truncation
    customize(dataset="support-v1", ...)                   # a stored name works wherever a dataset path does

The implementation lives in ``nemo_customizer.data.store``; this module is its public name.
"""

from nemo_customizer.data._store_report import DatasetReport, FileSummary, LengthHistogram
from nemo_customizer.data.store import (
    StoredDataset,
    check_name,
    dataset_report,
    default_store_dir,
    delete_dataset,
    get_dataset,
    list_datasets,
    resolve_dataset_path,
    upload,
)

__all__ = [
    "DatasetReport", "FileSummary", "LengthHistogram", "StoredDataset", "check_name", "dataset_report",
    "default_store_dir", "delete_dataset", "get_dataset", "list_datasets", "resolve_dataset_path", "upload",
]
