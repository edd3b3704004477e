# diagnosis 2 of the vocab-load crash on CUDA (not part of the project)
export PYTHONUNBUFFERED=1
ONLY_BUILD=1 PY=python3 WHEELHOUSE=.gpu SDIST=.gpu/pyllama_inf-0.1.0.tar.gz DEADLINE_S=400 bash benchmarks/gpu_check.sh $OUT || exit 1
L=$PWD/.gpu/load.py
cd /tmp
python3 -c "from pyllama_inf.testing import write_random_llama; write_random_llama('/tmp/sep.gguf', seed=1)"
for m in plain npfirst nprandom; do timeout 30 python3 $L $m /tmp/sep.gguf >> $OUT/diag.txt 2>&1; echo "$m sep rc=$?" | tee -a $OUT/gpu.txt; done
for m in write npfirst-write; do timeout 30 python3 $L $m /tmp/w-$m.gguf >> $OUT/diag.txt 2>&1; echo "$m rc=$?" | tee -a $OUT/gpu.txt; done
timeout 30 python3 $L plain /tmp/w-write.gguf >> $OUT/diag.txt 2>&1; echo "plain on the file written in-process: rc=$?" | tee -a $OUT/gpu.txt
cmp /tmp/sep.gguf /tmp/w-write.gguf && echo same-file | tee -a $OUT/gpu.txt
ldd $(python3 -c "import pyllama_inf._core as c; print(c.__file__)") > $OUT/ldd.txt 2>&1
nm -D --defined-only $(python3 -c "import pyllama_inf._core as c; print(c.__file__)") | grep -c codecvt | tee -a $OUT/gpu.txt
grep -E "libs:|LOADED|locale env|Fatal" $OUT/diag.txt | cut -c1-600
