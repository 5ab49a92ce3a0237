"""The LLM side: offline models (`models`), engines (`engines`: vllm, transformers), thinking budget
(`thinking`), the Ray Serve deployment with an OpenAI API (`serve`) and the batch client (`client`)."""
