#!/bin/sh
# The image's entry point: `docker run IMAGE train ...` runs gptforge; `docker run IMAGE bash` (or python, sh, any
# program of the image) runs that program instead.
case "$1" in
    "" | -* | info | create | export | tokenizer | prepare | train | demo | classify | generate | eval | merge | quantize | serve)
        exec gptforge "$@" ;;
esac
if command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec gptforge "$@"
