"""Fitting the hand model to captured data: scan sequences and keypoints (metres throughout).

Scan sequences: `load_scans` -> `register_sequence` -> `write_outputs` (or `mano-jax register`).
Keypoints: `fit_keypoints` (or `mano-jax fit-keypoints`).
"""

from .config import RegistrationConfig
from .keypoints import KeypointFitConfig, fit_keypoints, procrustes_error
from .many import Task, read_manifest, run_many
from .outputs import register_to_directory, scan_to_mesh_distance, write_outputs
from .pipeline import Registration, RegistrationError, register_sequence
from .result import RegistrationResult, load_result, save_result
from .scans import ScanError, ScanSequence, ScanWarning, load_scans, save_scans
from .synthetic import GroundTruth, make_sequence

__all__ = [
    "GroundTruth",
    "KeypointFitConfig",
    "Registration",
    "RegistrationConfig",
    "RegistrationError",
    "RegistrationResult",
    "ScanError",
    "ScanSequence",
    "ScanWarning",
    "Task",
    "fit_keypoints",
    "procrustes_error",
    "load_result",
    "load_scans",
    "make_sequence",
    "read_manifest",
    "register_sequence",
    "register_to_directory",
    "run_many",
    "save_result",
    "save_scans",
    "scan_to_mesh_distance",
    "write_outputs",
]
