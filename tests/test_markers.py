"""The 40 HEX marker names, defined once in the runtime package."""

from hexfast.markers import MARKERS, NUM_MARKERS


def test_marker_order():
    assert NUM_MARKERS == len(MARKERS) == 40 and len(set(MARKERS)) == 40
    assert MARKERS[:5] == ("DAPI", "CD8", "Pan-Cytokeratin", "CD3e", "CD163")
    assert MARKERS[23] == "Mac2/Galectin-3" and MARKERS[-1] == "HLA-DR"
