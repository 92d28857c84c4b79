"""The storage SOP classes our outputs are sent as, and the names an operator reads for them.

Shared by the settings (a destination may pin the SR class), the outputs (which classes an SR
can be written in) and delivery (what is proposed to a PACS, in which order).
"""

from __future__ import annotations

from pydicom.uid import UID

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: The SR classes, most specific first: the order delivery proposes an SR in.
SR_CLASSES = (COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR, ENHANCED_SR)

#: The values of a destination's ``sr=`` option, each naming one SR class.
SR_CLASS_OPTIONS = {
    "comprehensive3d": COMPREHENSIVE_3D_SR,
    "comprehensive": COMPREHENSIVE_SR,
    "enhanced": ENHANCED_SR,
}

#: Every class an output of ours may be sent as (the capability check proposes them all).
OUTPUT_CLASSES = (*SR_CLASSES, SECONDARY_CAPTURE)


def sop_class_name(uid: str) -> str:
    """``"Comprehensive SR"`` for 1.2.840.10008.5.1.4.1.1.88.33; the UID itself when pydicom
    does not know it."""
    name = UID(uid).name
    if name == uid:
        return uid
    return name.removesuffix(" Storage")
