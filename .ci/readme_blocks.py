"""Write each ```bash block of one README section to a temp file; print the paths."""

import re
import sys
import tempfile

path, section = sys.argv[1], sys.argv[2]
text = open(path, encoding="utf-8").read()
match = re.search(rf"^## {re.escape(section)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
if match is None:
    sys.exit(f"{path}: no '## {section}' section")
for i, body in enumerate(re.findall(r"^```bash\n(.*?)^```", match.group(1), flags=re.M | re.S), 1):
    with tempfile.NamedTemporaryFile("w", suffix=f"_block{i}.sh", delete=False) as f:
        f.write(body)
    print(f.name)
