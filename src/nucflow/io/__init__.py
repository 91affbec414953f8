"""Open microscopy stacks lazily as dask arrays; write OME-Zarr images and label images.

Only this package and ``pipeline`` touch disk. Readers never load pixels when opening: they
read metadata, then build a dask array whose tasks open the file *by path* and read only
their region, so the graph pickles and runs on process, LocalCluster and SLURM workers.

Layout: ``source`` (the ``Source`` protocol every format produces), ``formats`` (the registry
``open_stack`` consults), one module per format family (``zarr_format``, ``tiff_format``,
``remote``: zarr by fsspec URL, ``bdv_format``: BigDataViewer XML + HDF5/N5,
``imaris_format``: .ims, ``bioio_format``: CZI/ND2/LIF; ``containers`` opens HDF5/N5 files
once per thread), ``stack``
(``Stack``, ``open_stack`` and the axis policy), ``writers`` (OME-Zarr output), ``timelapse``
(one time point of a label image with a time axis).
"""

from nucflow.io.bdv_format import BdvFormat, pixel_files
from nucflow.io.bioio_format import VendorFormat
from nucflow.io.formats import Format, input_paths, register_format, supported_formats
from nucflow.io.imaris_format import ImarisFormat
from nucflow.io.remote import UrlFormat, url_digest
from nucflow.io.source import SUPPORTED_DTYPES, ChunkListing, Source, is_url, split_scene
from nucflow.io.stack import Stack, open_stack
from nucflow.io.tiff_format import TiffFormat, TiffSlicesFormat
from nucflow.io.timelapse import TimePoint, clear_timepoint
from nucflow.io.writers import create_label_zarr, image_reference, ome_metadata, write_ome_zarr
from nucflow.io.zarr_format import ZarrFormat

# Tried in this order: the first format that claims a path opens it (a zarr folder may also
# hold .tif files; a folder of slices is what is left; no local format claims a URL).
register_format(ZarrFormat())
register_format(TiffFormat())
register_format(TiffSlicesFormat())
register_format(BdvFormat())
register_format(ImarisFormat())
register_format(VendorFormat())
register_format(UrlFormat())

SUPPORTED_FORMATS = supported_formats()

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_FORMATS",
    "ChunkListing",
    "Format",
    "Source",
    "Stack",
    "TimePoint",
    "clear_timepoint",
    "create_label_zarr",
    "image_reference",
    "ome_metadata",
    "input_paths",
    "is_url",
    "open_stack",
    "pixel_files",
    "register_format",
    "split_scene",
    "url_digest",
    "write_ome_zarr",
]
