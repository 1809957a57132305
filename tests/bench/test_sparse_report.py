"""The README's results table: quality rows from a sweep JSON, speed cells from benchmark CSVs, peer rows from a
peer harness's JSON (speed only)."""
import json

from patchattn.bench import sparse_report


def _write(tmp_path):
    quality = {"model": "tiny", "results": [
        {"method": "dense", "ratio@8192": 1.0, "density@8192": 1.0, "passkey@8192": 1.0},
        {"method": "hip", "ratio@8192": 1.1, "density@8192": 0.2, "passkey@8192": 1.0}]}
    (tmp_path / "q.json").write_text(json.dumps(quality))
    (tmp_path / "s.csv").write_text(
        "# meta\nmode,T,B,method,speedup_vs_sdpa,kernel_speedup_vs_sdpa,graph_speedup_vs_sdpa,vs_flex\n"
        "prefill,131072,1,hip,14.0,40.0,,1.7\n"
        "decode,131072,1,hip,0.8,,7.9,\n")
    peer = {"rows": [{"T": 131072, "sdpa_ms": 250.0, "hip_attn_ms": 200.0},
                     {"mode": "decode", "T": 131072, "B": 8, "sdpa_ms": 0.9, "hip_attn_step_ms": 0.3,
                      "sdpa_graph_ms": 0.9, "hip_attn_graph_ms": 0.15},
                     {"T": 32768, "sdpa_ms": 15.0, "hip_attn_error": "did not compile"}]}
    (tmp_path / "p.json").write_text(json.dumps(peer))


def test_table_has_method_and_peer_rows(tmp_path):
    _write(tmp_path)
    assert sparse_report.main(["--quality", str(tmp_path / "q.json"), "--speed", str(tmp_path / "s.csv"),
                               "--peer", f"hip-attn={tmp_path / 'p.json'}", "--out", str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out" / "RESULTS.md").read_text().splitlines()
    hip = next(line for line in lines if line.startswith("| `hip` "))
    assert "40.0x / 14.0x" in hip and "0.8x / 7.9x" in hip and "1.70x" in hip
    peer = next(line for line in lines if line.startswith("| `hip-attn` "))
    cells = [c.strip() for c in peer.strip("|").split("|")]
    assert cells[1:4] == ["-", "-", "-"]  # no quality figures for a peer
    assert "- / 1.2x" in peer  # prefill: 250 / 200, no separate kernel time
    assert "3.0x / 6.0x" in peer  # decode B=8: eager / graphed
    assert (tmp_path / "out" / "quality_vs_speed.png").exists()
