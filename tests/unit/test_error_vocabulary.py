"""One error vocabulary: every code has one HTTP status, and the README's tables say the same."""

import re
from pathlib import Path

from topics.errors import HTTP_STATUS, ErrorCode

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_code_has_one_status_and_only_the_model_or_the_product_answers_5xx():
    assert set(HTTP_STATUS) == set(ErrorCode)
    server_side = {code for code, status in HTTP_STATUS.items() if status >= 500}
    assert server_side == {ErrorCode.INFERENCE_FAILED, ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE,
                           ErrorCode.DEADLINE_EXCEEDED}


def test_the_readme_lists_every_code_with_its_status():
    rows = re.findall(r"^\s*\| `([A-Z_]+)` \| (\d{3}) \|", README.read_text(), flags=re.MULTILINE)
    listed: dict[str, set[int]] = {}
    for code, status in rows:
        listed.setdefault(code, set()).add(int(status))
    assert set(listed) == {code.value for code in ErrorCode}
    assert {code: statuses for code, statuses in listed.items() if statuses != {HTTP_STATUS[ErrorCode(code)]}} == {}
