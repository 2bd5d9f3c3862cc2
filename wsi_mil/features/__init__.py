"""Encoders and the HDF5 feature cache (``wsi-mil extract``).

Public API: :func:`create_encoder` (registry: :func:`register_encoder`, :func:`list_encoders`),
:class:`EncoderInfo`, :func:`encoder_tag`, :func:`preprocess`, :func:`extract_slides`,
:func:`default_features_dir`, and the feature-store readers/writers
(:func:`open_features`, :func:`write_features`, :func:`find_feature_file`).
"""

from __future__ import annotations

from wsi_mil.features.encoders import (
    EncoderInfo,
    create_encoder,
    encoder_tag,
    list_encoders,
    load_weights_file,
    preprocess,
    register_encoder,
    state_dict_sha256,
)
from wsi_mil.features.extract import (
    PatchBatchLoader,
    build_encoder,
    default_features_dir,
    extract_slides,
    extract_store,
    prepare_model,
    resolve_device,
)
from wsi_mil.features.feature_store import (
    FeatureBag,
    FeatureStoreWriter,
    find_feature_file,
    open_features,
    write_features,
)
from wsi_mil.features.resnet import ResNetPatchCNN

__all__ = [
    "EncoderInfo",
    "FeatureBag",
    "FeatureStoreWriter",
    "PatchBatchLoader",
    "ResNetPatchCNN",
    "build_encoder",
    "create_encoder",
    "default_features_dir",
    "encoder_tag",
    "extract_slides",
    "extract_store",
    "find_feature_file",
    "list_encoders",
    "load_weights_file",
    "open_features",
    "prepare_model",
    "preprocess",
    "register_encoder",
    "resolve_device",
    "state_dict_sha256",
    "write_features",
]
