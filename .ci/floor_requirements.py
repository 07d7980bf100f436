"""Print setup.cfg's install_requires with every `>=` floor turned into `==`, for pip (torch excluded: CI has one CPU build)."""

import configparser
import re
from pathlib import Path

config = configparser.ConfigParser()
config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
for requirement in config["options"]["install_requires"].split("\n"):
    floor = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)>=([0-9][^,\s]*)\s*", requirement)
    if floor and floor.group(1) != "torch":
        print(f"{floor.group(1)}=={floor.group(2)}")
