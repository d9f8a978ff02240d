"""POST an API-format prompt to a running ComfyUI and wait for its /history entry.

    python examples/run_api_prompt.py examples/api_prompt_sd15.json [--url http://127.0.0.1:8188]
Prints the status, the node outputs and, on error, the exception message; exit code 0 on success.
Options: --set NODE.INPUT=JSON (override an input, e.g. --set '2.adapter_name="sdxl_lora.safetensors"').
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def request(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("prompt")
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    with open(args.prompt, encoding="utf-8") as f:
        prompt = json.load(f)
    for item in args.set:
        path, value = item.split("=", 1)
        node, name = path.split(".", 1)
        prompt[node]["inputs"][name] = json.loads(value)
    start = time.time()
    status, reply = request(f"{args.url}/prompt", {"prompt": prompt})
    if status != 200:
        print(f"POST /prompt -> {status}: {json.dumps(reply, indent=1)}")
        return 1
    pid = reply["prompt_id"]
    while time.time() - start < args.timeout:
        _, hist = request(f"{args.url}/history/{pid}")
        if pid in hist:
            entry = hist[pid]
            st = entry["status"]
            print(f"prompt {pid}: {st['status_str']} (completed={st['completed']}) in {time.time() - start:.1f}s")
            for node_id, out in entry["outputs"].items():
                for key, value in out.items():
                    text = value if key == "lycoris" else f"{len(value)} item(s)"
                    print(f"  node {node_id} {key}: {text}")
            for event, data in st["messages"]:
                if event == "execution_error":
                    print(f"  error in node {data['node_id']} ({data['node_type']}): "
                          f"{data['exception_type']}: {data['exception_message'].strip()}")
                if event == "execution_cached":
                    print(f"  cached nodes: {data['nodes']}")
            return 0 if st["status_str"] == "success" else 2
        time.sleep(0.5)
    print("timed out")
    return 3


if __name__ == "__main__":
    sys.exit(main())
