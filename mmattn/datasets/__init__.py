"""The embedded demo data and the dataset presence check used by the tools."""
from .check import check_datasets
from .demo import DEMO_ROOT, DEMO_VERSION, demo_data_ok, make_demo_data

__all__ = ['DEMO_ROOT', 'DEMO_VERSION', 'check_datasets', 'demo_data_ok', 'make_demo_data']
