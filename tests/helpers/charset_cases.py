"""The character-set matrix shared by tests/test_charsets.py and tests/test_charsets_e2e.py.

One case per Defined Term of PS3.3 C.12.1.1.2 (single-byte without and with code extensions,
multi-byte with and without), the multi-valued combinations Japanese and Korean scanners send,
and what real scanners get wrong. Each case names the Specific Character Set as written into the
header and the text in characters its repertoire can encode; :func:`apply_case` writes that text
as the bytes such a scanner would send. The bytes are made by pydicom's encoder in the set the
bytes are really in (``encoded_in``), which for a misspelt or missing declaration differs from
what is declared; ``tests/test_charsets.py`` checks them against DCMTK's own decoder.
"""

# ruff: noqa: RUF001  (text in Cyrillic, Greek, Hebrew... on purpose: letters that look Latin)

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pydicom.charset import encode_string
from pydicom.dataelem import DataElement
from pydicom.valuerep import PersonName

from hrct_triage.common.charsets import resolve

ABSENT = None  # no Specific Character Set in the header


@dataclass(frozen=True)
class Text:
    """What a scanner of one language writes: a name (all its component groups) and two
    descriptions."""

    patient_name: str
    study_description: str
    series_description: str


ASCII = Text("Smith^John", "CT CHEST HRCT", "LUNG THIN")
LATIN_1 = Text("Müller^Jürgen", "CT Thorax hochauflösend", "Lunge dünn")
LATIN_2 = Text("Dvořák^Antonín", "CT hrudníku", "Plíce tenké řezy")
LATIN_3 = Text("Ċaruana^Ġorġ", "CT tas-sider, Ħamrun", "Pulmun ġdid")
LATIN_4 = Text("Bērziņš^Jānis", "Krūškurvja DT", "Plaušas plānas šķēles")
CYRILLIC = Text("Иванов^Иван", "КТ органов грудной клетки", "Лёгкие тонкие срезы")
ARABIC = Text("قباني^لنزار", "تصوير مقطعي للصدر", "الرئتان")
GREEK = Text("Παπαδόπουλος^Γιώργος", "Αξονική τομογραφία θώρακος", "Πνεύμονες λεπτές τομές")
HEBREW = Text("שרון^דבורה", "סי טי חזה", "ריאות")
LATIN_5 = Text("Öztürk^Şükrü", "Toraks BT yüksek çözünürlük", "Akciğer ince kesit")
LATIN_9 = Text("Œuvray^Zoé", "Scanner thoracique, coût 10 €", "Poumons fenêtre")
KATAKANA = Text("ﾔﾏﾀﾞ^ﾀﾛｳ", "ｷｮｳﾌﾞ", "ﾊｲﾔ")  # pydicom writes no Roman beside kana
THAI = Text("สมชาย^ใจดี", "ซีทีทรวงอก", "ปอด")
JAPANESE = Text("Yamada^Tarou=山田^太郎=やまだ^たろう", "胸部CT 高分解能", "肺野条件 薄層")
JAPANESE_KATAKANA = Text("ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "胸部CT ｺｳｾｲﾄﾞ", "肺野 ﾊｸｿｳ")
JAPANESE_SUPPLEMENTARY = Text("Mori^Ougai=森^鷗外=もり^おうがい", "胸部CT 鷗", "肺野")
SUPPLEMENTARY_ONLY = Text("Mori^Ougai=丂^鷗", "CT 丂", "LUNG 鷗")
KOREAN = Text("Hong^Gildong=洪^吉洞=홍^길동", "흉부 CT", "폐 박층")
CHINESE = Text("Zhang^XiaoDong=张^小东", "胸部CT平扫", "肺窗 薄层")
CHINESE_GBK = Text("Wang^XiaoDong=王^小東", "胸部CT", "肺窗")


@dataclass(frozen=True)
class Case:
    """A header's Specific Character Set as sent, the text, and what the gateway must say.

    ``declared`` is the value written (backslashes separate values; None: the attribute is
    absent); ``encoded_in`` the set the bytes really are in; ``substituted`` whether the
    gateway must record that it read the text in another set than declared.
    """

    id: str
    declared: str | None
    text: Text
    encoded_in: str
    substituted: bool = False

    @property
    def declared_value(self) -> str | list[str] | None:
        if self.declared is None or "\\" not in self.declared:
            return self.declared
        return self.declared.split("\\")


def _plain(term: str, text: Text) -> Case:
    return Case(term, term, text, term)


def _extended(term: str, text: Text) -> Case:
    """A code-extension term on its own: its text as ISO 2022 writes it after ASCII."""
    return Case(term, term, text, f"\\{term}")


_SINGLE_BYTE = {
    "ISO_IR 100": LATIN_1,
    "ISO_IR 101": LATIN_2,
    "ISO_IR 109": LATIN_3,
    "ISO_IR 110": LATIN_4,
    "ISO_IR 144": CYRILLIC,
    "ISO_IR 127": ARABIC,
    "ISO_IR 126": GREEK,
    "ISO_IR 138": HEBREW,
    "ISO_IR 148": LATIN_5,
    "ISO_IR 203": LATIN_9,
    "ISO_IR 13": KATAKANA,
    "ISO_IR 166": THAI,
}

#: Item 1: every Defined Term, and the multi-valued forms scanners send.
STANDARD = [
    *(_plain(term, text) for term, text in _SINGLE_BYTE.items()),
    _plain("ISO 2022 IR 6", ASCII),
    *(_plain(term.replace("_IR", " 2022 IR"), text) for term, text in _SINGLE_BYTE.items()),
    _extended("ISO 2022 IR 87", JAPANESE),
    _extended("ISO 2022 IR 159", SUPPLEMENTARY_ONLY),
    _extended("ISO 2022 IR 149", KOREAN),
    _extended("ISO 2022 IR 58", CHINESE),
    _plain("ISO_IR 192", JAPANESE),
    _plain("GB18030", CHINESE),
    _plain("GBK", CHINESE_GBK),
    _plain("ISO 2022 IR 6\\ISO 2022 IR 87", JAPANESE),
    _plain("ISO 2022 IR 13\\ISO 2022 IR 87", JAPANESE_KATAKANA),
    _plain("ISO 2022 IR 6\\ISO 2022 IR 87\\ISO 2022 IR 159", JAPANESE_SUPPLEMENTARY),
    _plain("\\ISO 2022 IR 87", JAPANESE),
    _plain("\\ISO 2022 IR 149", KOREAN),
    _plain("\\ISO 2022 IR 58", CHINESE),
    Case("absent, ASCII text", ABSENT, ASCII, ""),
]

#: Item 2: what real scanners get wrong; each is read and the substitution recorded.
MISTAKES = [
    Case("ISO_IR 149 (Korean, not a Defined Term)", "ISO_IR 149", KOREAN, "ISO 2022 IR 149", True),
    Case("ISO-8859-1", "ISO-8859-1", LATIN_1, "ISO_IR 100", True),
    Case("iso_ir 100 (lower case)", "iso_ir 100", LATIN_1, "ISO_IR 100", True),
    Case("iso_ir 192 (lower case)", "iso_ir 192", JAPANESE, "ISO_IR 192", True),
    Case("absent, UTF-8 bytes", ABSENT, JAPANESE, "ISO_IR 192", True),
    Case("absent, Latin-1 bytes", ABSENT, LATIN_1, "ISO_IR 100", True),
    Case("unknown ISO_IR 999, Latin-1 bytes", "ISO_IR 999", LATIN_1, "ISO_IR 100", True),
    Case("unknown KANJI, ISO 2022 bytes", "KANJI", JAPANESE, "\\ISO 2022 IR 87", True),
    Case("ISO_IR 192 over Latin-1 bytes", "ISO_IR 192", LATIN_1, "ISO_IR 100", True),
]

ALL = STANDARD + MISTAKES


def apply_case(ds: Dataset, case: Case) -> None:
    """Write ``case``'s Specific Character Set and text into ``ds`` as a scanner would send them.

    Patient Name, Study Description and Series Description are set as bytes in
    ``case.encoded_in``, so pydicom writes them as they are whatever ``ds`` declares.
    """
    encodings = resolve(case.encoded_in.split("\\")).encodings
    name = PersonName(case.text.patient_name).encode(encodings)
    texts = {
        "StudyDescription": encode_string(case.text.study_description, encodings),
        "SeriesDescription": encode_string(case.text.series_description, encodings),
    }
    for raw in (name, *texts.values()):
        assert b"\\" not in raw, f"{case.id}: the encoding holds a backslash byte"
    if case.declared is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = case.declared_value
    ds[0x00100010] = DataElement(0x00100010, "PN", name)
    for keyword, raw in texts.items():
        ds[keyword] = DataElement(keyword, "LO", raw)
