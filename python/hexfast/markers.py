"""The 40 HEX output channels, in output order (index 0..39).

Defined once here; the runtime, the exporter (`hexfast_export`) and the model
bundle manifests all read this tuple.
"""

from __future__ import annotations

MARKERS: tuple[str, ...] = (
    "DAPI", "CD8", "Pan-Cytokeratin", "CD3e", "CD163",
    "CD20", "CD4", "FAP", "CD138", "CD11c",
    "CD66b", "aSMA", "CD68", "Ki67", "CD31",
    "Collagen IV", "Granzyme B", "MMP9", "PD-1", "CD44",
    "PD-L1", "E-cadherin", "LAG3", "Mac2/Galectin-3", "FOXP3",
    "CD14", "EpCAM", "CD21", "CD45", "MPO",
    "TCF-1", "ICOS", "Bcl-2", "HLA-E", "CD45RO",
    "VISTA", "HIF1A", "CD39", "CD40", "HLA-DR",
)

NUM_MARKERS = len(MARKERS)
assert NUM_MARKERS == 40
