"""Readers and writers: NIfTI (nibabel), atomic file output."""

from .atomic import atomic_path, write_json
from .nifti import load_nifti, save_nifti

__all__ = ["atomic_path", "load_nifti", "save_nifti", "write_json"]
