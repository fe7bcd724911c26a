/* Chat prompts: the messages of a /v1/chat/completions request turned into
 * prompt ids in the format the model was trained on. The formats are those of
 * llama.cpp's built-in templates that cover the models cake runs (below); a
 * model's template (GGUF tokenizer.chat_template,
 * Jinja) is recognised by its marker strings, as llama.cpp does, not run.
 *
 * Special tokens (<|im_start|>, <|eot_id|>, ...) are inserted by id; the
 * messages' text is tokenized as plain text, so a message that contains
 * "<|im_end|>" cannot end its turn early. */
#ifndef CAKE_SERVER_CHAT_H
#define CAKE_SERVER_CHAT_H

#include <stddef.h>
#include <time.h>

#include "model/tokenizer.h"

typedef enum {
    CHAT_NONE = 0,
    CHAT_CHATML,         /* <|im_start|>role\n...<|im_end|>: Qwen */
    CHAT_LLAMA3,         /* <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> */
    CHAT_LLAMA2,         /* <s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] ... </s> */
    CHAT_MISTRAL,        /* <s>[INST] ... [/INST]...</s>[INST] ... (Mistral 7B v0.1) */
    CHAT_ZEPHYR,         /* <|user|>\n...</s>\n<|assistant|>\n (Zephyr, TinyLlama Chat) */
    CHAT_PHI3,           /* <|user|>\n...<|end|>\n<|assistant|>\n (Phi-3, Phi-3.5) */
    CHAT_MISTRAL_TEKKEN, /* [INST]...[/INST]...</s> (Mistral Nemo: v3-tekken) */
    CHAT_MISTRAL_V7,     /* [SYSTEM_PROMPT] ...[/SYSTEM_PROMPT][INST] ...[/INST] (Large 2411) */
    CHAT_PHI4,           /* <|im_start|>user<|im_sep|>...<|im_end|> (Phi-4) */
    CHAT_GEMMA,          /* <start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n */
    CHAT_GRANITE,        /* <|start_of_role|>user<|end_of_role|>...<|end_of_text|>\n (Granite 3) */
    CHAT_MISTRAL_V3,     /* [INST] ...[/INST] ...</s> (Mistral 7B Instruct v0.3) */
    CHAT_DEEPSEEK, /* {system}<｜User｜>...<｜Assistant｜>...EOS (DeepSeek-R1's distills) */
    CHAT_MISTRAL_V7_TEKKEN, /* [SYSTEM_PROMPT]...[INST]...[/INST]...</s> (Small 3) */
    CHAT_MISTRAL_V1,        /* <s> [INST] ... [/INST] ...</s> (7B v0.2's later template) */
    /* v7-tekken's messages with later tool calls: [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}
     * (v11: Small 3.2, Magistral, Devstral Small 1.x), [TOOL_CALLS]name[ARGS]{...}
     * (v13: Ministral 3, Devstral 2) */
    CHAT_MISTRAL_V11,
    CHAT_MISTRAL_V13,
} chat_format;

/* A function call an assistant's message made (OpenAI's tool_calls). */
typedef struct {
    const char *name;
    const char *arguments; /* a JSON object, as the prompt writes it */
    const char *id;        /* Mistral's: 9 letters or digits (NULL: none given) */
} chat_tool_call;

typedef struct {
    const char *role; /* "system", "user", "assistant", or "tool" (a call's result) */
    const char *content;
    size_t content_len;
    const chat_tool_call *calls; /* an assistant's, n_calls of them */
    int n_calls;
    const char *call_id; /* a tool result's call (as chat_tool_call.id; NULL: none) */
} chat_message;

/* The functions a request offers (OpenAI's tools), each as the JSON text
 * the prompt lists it with. */
typedef struct {
    const char *const *json;
    int n;
} chat_tools;

/* What a prompt holds besides its messages. */
typedef struct {
    const chat_tools *tools; /* NULL: none */
    /* A thinking model (its vocabulary has <think>) told not to think (Qwen
     * 3's enable_thinking false): ChatML opens its answer with an empty
     * <think></think>, as Qwen 3's template does. */
    int no_thinking;
    /* ChatML and Mistral v7: the system message when the messages have none,
     * as the template writes one (chat_default_system,
     * chat_dated_default_system; NULL: none) */
    const char *default_system;
    /* Llama 3.1 and later: the date of the system turn their templates
     * always write (chat_llama3_date; NULL: none, as Llama 3.0's) */
    const char *date;
    /* The template opens the answer's reasoning, "<think>\n" after the
     * answer's header (chat_opens_thinking: DeepSeek-R1's distills, QwQ;
     * ChatML and DeepSeek formats) */
    int open_thinking;
    /* ChatML: the answers before the last user message without their
     * reasoning (chat_strips_reasoning: Qwen 3's, QwQ's) */
    int strip_reasoning;
} chat_options;

/* How a format's model writes a function call: a JSON object {"name": ...,
 * args: {...}} between open and close, or (both "") as the whole answer;
 * with list, a JSON array of them after open (Mistral's [TOOL_CALLS]);
 * with args_tag, open, the name, args_tag and the arguments' object, with
 * id_tag and an id before args_tag where the model writes one (Mistral
 * v11's [TOOL_CALLS]name[CALL_ID]id[ARGS]{...}). NULL for a format without
 * tools. */
typedef struct {
    const char *open, *close, *args;
    int list;
    const char *args_tag, *id_tag; /* NULL: none */
} chat_call_syntax;
const chat_call_syntax *chat_calls(chat_format f);

/* The tags of c (open, args_tag, id_tag) that are control tokens of t,
 * which print nothing (Mistral's [TOOL_CALLS], [ARGS], [CALL_ID]): their
 * ids and texts, at most CHAT_CALL_TAGS; how many. A tool request's answer
 * prints them as their text, and its grammar reads them so. */
#define CHAT_CALL_TAGS 3
int chat_silent_tags(const chat_call_syntax *c, const cake_tokenizer *t, cake_token *ids,
                     const char **texts);
/* Of texts[0..n) (NULL ones skipped), those that are control tokens of t,
 * which print nothing: their ids and texts; how many. */
int chat_silent_tokens(const cake_tokenizer *t, const char *const *texts, int n, cake_token *ids,
                       const char **out);

/* What joins a message's text parts (OpenAI's content as a list): "\n\n"
 * in Mistral's later formats (v7-tekken, v11, v13: mistral-common's
 * templates), else nothing. */
const char *chat_parts_separator(chat_format f);

/* The format of a chat template's text (NULL: the model has none; then the
 * vocabulary's special tokens decide). CHAT_NONE when neither tells. */
chat_format chat_detect(const char *template_text, const cake_tokenizer *t);
const char *chat_format_name(chat_format f);
/* The format named name (as chat_format_name writes it, "none" not one).
 * 0, or -1 for a name that is not one. */
int chat_format_parse(const char *name, chat_format *out);

/* The system message a ChatML template writes when the messages have none
 * (Qwen2's "You are a helpful assistant.", Qwen2.5's "You are Qwen, created
 * by Alibaba Cloud. ...", SmolLM2's): the text of a string literal
 * '<|im_start|>system\n...<|im_end|>' in it, unescaped. malloc'd; NULL:
 * none (or out of memory). */
char *chat_default_system(const char *template_text);

/* The system message a Mistral v7 template (Small 3's) writes when a chat
 * has none: {%- set default_system_message = "..." + today + "..." %}, its
 * variables days as the template sets them (today = strftime_now(
 * "%Y-%m-%d")), rendered for the day of `now` (local time); {today} and
 * {yesterday} in its text (Ministral 3's, which Mistral's docs fill in
 * before use) as YYYY-MM-DD. malloc'd; NULL: none (or not one cake can
 * read). */
char *chat_dated_default_system(const char *template_text, time_t now);

/* Whether a template writes "<think>\n" after the header of the answer
 * it asks for (DeepSeek-R1's distills, QwQ): the model's answer then
 * begins inside its reasoning. */
int chat_opens_thinking(const char *template_text);
/* Whether a template cuts an earlier answer's reasoning out of the prompt
 * (.split('</think>'): Qwen 3's, QwQ's, DeepSeek-R1's). */
int chat_strips_reasoning(const char *template_text);

/* Whether a Llama 3 template writes a system turn with its knowledge cutoff
 * and a date in every chat (Llama 3.1, 3.2, 3.3): the date it writes, "26
 * Jul 2024" as 3.1's does, or "" for the day's date (3.2's and 3.3's
 * strftime_now, as vLLM and llama.cpp render it). malloc'd; NULL: it does
 * not (Llama 3.0), or out of memory. */
char *chat_llama3_date(const char *template_text);

/* The prompt of messages m[0..n) in format f, with opt (NULL: none; tools
 * in the formats chat_calls knows), ending with the header of the
 * assistant's turn, into a malloc'd *ids. *end_of_turn gets the token that
 * ends the assistant's turn besides EOS (-1: EOS only). 0, or -1 with a
 * reason in err (a role other than the three, a special token missing from
 * the vocabulary, out of memory). */
int chat_prompt(chat_format f, const cake_tokenizer *t, const chat_message *m, int n,
                const chat_options *opt, cake_token **ids, int *n_ids, cake_token *end_of_turn,
                char *err, size_t errlen);

#endif
