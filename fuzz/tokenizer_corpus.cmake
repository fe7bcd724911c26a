# cmake -DSEEDS=dir -DINP=file -DOUT=dir -P tokenizer_corpus.cmake
# Copies the committed seeds into OUT, and llama.cpp's tokenizer test text
# (ggml-vocab-llama-spm.gguf.inp, when present) once per vocabulary, each copy
# behind the first byte that picks that vocabulary ('0'..'3').
file(MAKE_DIRECTORY ${OUT})
file(GLOB seeds ${SEEDS}/*)
file(COPY ${seeds} DESTINATION ${OUT})
if(EXISTS ${INP})
    file(READ ${INP} text)
    foreach(vocab 0 1 2 3)
        file(WRITE ${OUT}/llama-spm-inp-${vocab} "${vocab}${text}")
    endforeach()
endif()
