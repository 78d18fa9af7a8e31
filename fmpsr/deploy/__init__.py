"""Use an exported (compact) network: upscale images (:mod:`.inference`, :mod:`.tiling`,
:mod:`.image_io`), export it to ONNX (:mod:`.onnx_export`) and store its unstructured zeros
compactly (:mod:`.sparse_store`). Nothing here trains or prunes."""
