from sttp_compress.cli import compress_main

compress_main()
