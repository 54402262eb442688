// The web chat page `fathom serve` answers GET / with: a conversation kept in the page, answers
// streamed as they are generated, R1-style reasoning in a collapsible block, a stop button, an
// API-key field for servers that need one. Self-contained (web_page.cpp): no external resource.
#pragma once
#include <string_view>

namespace fathom::serve {

std::string_view chat_page_html();

}  // namespace fathom::serve
