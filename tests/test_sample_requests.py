"""Bad sampling requests fail before any compute with one line naming the value (issue 14,
"Sampling"): the real flag definitions and the real request check, in process."""

import pytest
from absl import flags

from vdit import sample


def _request(tmp_path, *args):
  fv = flags.FlagValues()
  sample._define_flags(fv)  # noqa: SLF001
  fv(["sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'out.gif'}", *args])
  return sample._request(fv)  # noqa: SLF001


@pytest.mark.parametrize(
  "args,message",
  [
    (["--prompt=a", "--steps=0"], r"--steps=0 must be ≥ 1 \(leave it out for the config's\)"),
    (["--prompt=a", "--num_frames=0"], r"--num_frames=0 must be ≥ 1"),
    (["--prompt=a", "--num_frames=-4"], r"--num_frames=-4 must be ≥ 1"),
    (["--prompt=a", "--height=0", "--width=0"], r"--height=0 must be ≥ 1"),
    (["--prompt=a", "--guidance=nan"], r"--guidance=nan must be a finite number"),
    (["--prompt=a", "--guidance=inf"], r"--guidance=inf must be a finite number"),
    (["--prompt=a", "--display_scale=0"], r"--display_scale=0 must be ≥ 1"),
    (["--prompt=a", "--fps=0"], r"--fps=0.0 must be a positive number"),
    ([], r"give --prompt or --prompts_file"),
  ],
)
def test_bad_numbers_and_missing_prompts_are_refused(tmp_path, args, message):
  with pytest.raises(sample.InputError, match=message):
    _request(tmp_path, *args)


def test_prompts_file_problems_are_refused(tmp_path):
  blank, binary = tmp_path / "blank.txt", tmp_path / "binary.txt"
  blank.write_text("\n   \n\n")
  binary.write_bytes(b"a red circle\n\xff\xfe moving\n")
  with pytest.raises(sample.InputError, match=r"holds no prompt \(every line is blank\)"):
    _request(tmp_path, f"--prompts_file={blank}")
  with pytest.raises(sample.InputError, match=r"binary.txt' is not UTF-8 text"):
    _request(tmp_path, f"--prompts_file={binary}")
  with pytest.raises(sample.InputError, match=r"missing.txt' cannot be read"):
    _request(tmp_path, f"--prompts_file={tmp_path / 'missing.txt'}")
  with pytest.raises(sample.InputError, match="not both"):
    _request(tmp_path, "--prompt=a", f"--prompts_file={blank}")


def test_a_good_request_passes(tmp_path):
  prompts_file = tmp_path / "p.txt"
  prompts_file.write_text("a red circle moving right\n\na blue square moving left\n")
  prompts, inputs = _request(tmp_path, f"--prompts_file={prompts_file}", "--steps=4")
  assert prompts == ["a red circle moving right", "a blue square moving left"]
  assert inputs == {"image": None, "video": None, "video2": None}
