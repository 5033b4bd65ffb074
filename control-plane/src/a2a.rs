//! A2A-style agent cards (the `/.well-known/agent-card.json` shape) and their mapping to
//! registry profiles, both ways.
//!
//! The model: a card is a *view* of a profile. [`AgentCard::from_agent`] exports one;
//! [`ImportedCard::from_json`] reads one back into a [`ProfileInput`] plus the agent's id
//! and key from the `molt` extension. The mapping is lossless or refused: every card
//! member either has a place in the profile or is refused with [`CardError::Unmappable`],
//! naming the member, so an import never drops what its author wrote. Hence exporting a
//! profile and importing the card gives the same profile back.
//!
//! | card | profile |
//! |---|---|
//! | `name`, `description` | `name`, `description` |
//! | `skills[].id`, `.tags`, `.version` | `capabilities[].name`, `.tags`, `.version` |
//! | `skills[].name` | must equal `id` (capabilities have no display name) |
//! | `skills[].description` | must be empty (capabilities have none) |
//! | `molt.{id, public_key}` | the agent; `id` must be derived from `public_key` |
//! | `molt.{key_binding, home_edge, visibility}` | the same (visibility defaults to public) |
//! | `version` | ignored: the registry numbers revisions itself |
//! | `protocolVersion` | ignored: it describes the card format |
//! | `capabilities` | every member `false`, `null` or `[]` (Molt offers none of them) |
//! | `defaultInputModes`, `defaultOutputModes` | `["application/json"]` or absent |
//! | `url`, `provider`, `security`, … | refused: the registry has no place for them |

use std::collections::BTreeMap;

use molt_protocol::AgentId;
use molt_protocol::keys::PublicKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::registry::{Agent, Capability, ProfileInput, Visibility};

/// The content type of agent card payloads Molt agents exchange.
pub const CARD_MODE: &str = "application/json";
/// Top-level A2A card members the registry cannot represent, refused on import (`url`
/// too, checked on the typed card).
pub const UNSUPPORTED_CARD_MEMBERS: [&str; 9] = [
    "provider",
    "documentationUrl",
    "iconUrl",
    "securitySchemes",
    "security",
    "additionalInterfaces",
    "preferredTransport",
    "supportsAuthenticatedExtendedCard",
    "signatures",
];
/// A2A skill members the registry cannot represent, refused on import when not empty.
pub const UNSUPPORTED_SKILL_MEMBERS: [&str; 4] = ["examples", "inputModes", "outputModes", "security"];

/// An A2A-style agent card with a `molt` extension.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentCard {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Absent on export; refused on import (agents are reached through edges by id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The A2A protocol version of the card format; ignored on import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// The profile revision on export; ignored on import.
    #[serde(default)]
    pub version: String,
    /// A2A optional features (`streaming`, `pushNotifications`, …); `{}` on export.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub capabilities: serde_json::Value,
    #[serde(default)]
    pub skills: Vec<AgentCardSkill>,
    #[serde(default = "default_modes")]
    pub default_input_modes: Vec<String>,
    #[serde(default = "default_modes")]
    pub default_output_modes: Vec<String>,
    pub molt: AgentCardMolt,
}

/// A skill: one capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentCardSkill {
    /// The capability name.
    pub id: String,
    /// The capability name again (capabilities have no display name); defaults to `id`.
    #[serde(default)]
    pub name: Option<String>,
    /// Empty (capabilities have no description).
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub version: String,
}

/// The Molt extension: who the card is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentCardMolt {
    /// The agent id, derived from `public_key`.
    pub id: String,
    /// Lower-case hex of the 32-byte Ed25519 inception key.
    pub public_key: String,
    /// Lower-case hex of `KeyBinding::encode()`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_binding: Option<String>,
    /// An edge id, `edge-…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_edge: Option<String>,
    /// Defaults to `public` on import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
}

/// A card read for import: whom it names and the profile it describes, not yet validated
/// ([`ProfileInput::validate`] does that).
#[derive(Clone, Debug)]
pub struct ImportedCard {
    pub id: AgentId,
    pub public_key: PublicKey,
    pub profile: ProfileInput,
}

/// Why a card could not be imported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CardError {
    /// Not JSON at all.
    #[error("importing an agent card: malformed JSON: {0}")]
    Malformed(serde_json::Error),
    /// JSON, but not a card: unknown or mistyped members, missing `molt`.
    #[error("importing an agent card: {0}")]
    Invalid(serde_json::Error),
    /// A member the registry has no place for; the message names it.
    #[error("importing an agent card: {0}")]
    Unmappable(String),
    #[error("importing an agent card: molt.public_key is not the hex of an Ed25519 public key")]
    PublicKey,
    #[error("importing an agent card: molt.id is not an agent id")]
    AgentId,
    #[error("importing an agent card: molt.id is not derived from molt.public_key")]
    NotDerived,
}

impl AgentCard {
    /// The card of a registered agent.
    pub fn from_agent(agent: &Agent) -> AgentCard {
        let profile = &agent.profile;
        AgentCard {
            name: profile.name.clone(),
            description: profile.description.clone(),
            url: None,
            protocol_version: None,
            version: agent.revision.to_string(),
            capabilities: empty_object(),
            skills: profile
                .capabilities
                .iter()
                .map(|capability| AgentCardSkill {
                    id: capability.name.clone(),
                    name: Some(capability.name.clone()),
                    description: String::new(),
                    tags: capability.tags.clone(),
                    version: capability.version.clone(),
                })
                .collect(),
            default_input_modes: default_modes(),
            default_output_modes: default_modes(),
            molt: AgentCardMolt {
                id: agent.id.to_string(),
                public_key: hex::encode(agent.public_key.as_bytes()),
                key_binding: profile.key_binding.map(|binding| hex::encode(binding.encode())),
                home_edge: profile.home_edge.map(|edge| edge.to_string()),
                visibility: Some(profile.visibility),
            },
        }
    }
}

impl ImportedCard {
    /// Reads a card from its JSON bytes and maps it, refusing what cannot be mapped.
    pub fn from_json(body: &[u8]) -> Result<ImportedCard, CardError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(CardError::Malformed)?;
        refuse_unsupported_members(&value)?;
        let card: AgentCard = serde_json::from_value(value).map_err(CardError::Invalid)?;
        ImportedCard::from_card(card)
    }

    /// Maps a parsed card, refusing what cannot be mapped.
    pub fn from_card(card: AgentCard) -> Result<ImportedCard, CardError> {
        let unmappable = |message: String| Err(CardError::Unmappable(message));
        if card.url.is_some() {
            return unmappable("url: Molt agents are reached through edges by id, not at a URL".to_owned());
        }
        if let Some(feature) = offered_feature(&card.capabilities) {
            return unmappable(format!("capabilities.{feature}: the registry cannot offer A2A optional features"));
        }
        for (member, modes) in
            [("defaultInputModes", &card.default_input_modes), ("defaultOutputModes", &card.default_output_modes)]
        {
            if modes.as_slice() != [CARD_MODE] {
                return unmappable(format!("{member}: Molt agents exchange [\"{CARD_MODE}\"] only"));
            }
        }
        let mut capabilities = Vec::with_capacity(card.skills.len());
        for (index, skill) in card.skills.into_iter().enumerate() {
            if skill.name.as_ref().is_some_and(|name| *name != skill.id) {
                return unmappable(format!(
                    "skills[{index}].name: a capability has no display name; make it equal to id ({:?}) or leave it out",
                    skill.id
                ));
            }
            if !skill.description.is_empty() {
                return unmappable(format!(
                    "skills[{index}].description: a capability has no description; leave it empty and describe the agent in description"
                ));
            }
            capabilities.push(Capability { name: skill.id, version: skill.version, tags: skill.tags });
        }
        let public_key = hex::decode(&card.molt.public_key)
            .ok()
            .and_then(|bytes| PublicKey::from_slice(&bytes).ok())
            .ok_or(CardError::PublicKey)?;
        let id: AgentId = card.molt.id.parse().map_err(|_| CardError::AgentId)?;
        if AgentId::from_inception_key(&public_key) != id {
            return Err(CardError::NotDerived);
        }
        let profile = ProfileInput {
            name: card.name,
            description: card.description,
            capabilities,
            key_binding: card.molt.key_binding,
            visibility: card.molt.visibility.unwrap_or(Visibility::Public),
            home_edge: card.molt.home_edge,
        };
        Ok(ImportedCard { id, public_key, profile })
    }
}

/// Refuses the A2A members the typed card leaves out, with a message naming each, before
/// the typed parse turns them into an anonymous "unknown field".
fn refuse_unsupported_members(value: &serde_json::Value) -> Result<(), CardError> {
    let Some(card) = value.as_object() else { return Ok(()) };
    if let Some(member) = UNSUPPORTED_CARD_MEMBERS.iter().find(|member| card.get(**member).is_some_and(is_set)) {
        return Err(CardError::Unmappable(format!("{member}: the registry has no place for it; remove it")));
    }
    let skills = card.get("skills").and_then(serde_json::Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for (index, skill) in skills.iter().enumerate() {
        let Some(skill) = skill.as_object() else { continue };
        if let Some(member) = UNSUPPORTED_SKILL_MEMBERS.iter().find(|member| skill.get(**member).is_some_and(is_set)) {
            return Err(CardError::Unmappable(format!(
                "skills[{index}].{member}: a capability has no place for it; remove it"
            )));
        }
    }
    Ok(())
}

/// The first A2A optional feature the card claims, if any.
fn offered_feature(capabilities: &serde_json::Value) -> Option<String> {
    let Some(features) = capabilities.as_object() else {
        return Some("(not an object)".to_owned());
    };
    let features: BTreeMap<_, _> = features.iter().collect();
    features.into_iter().find(|(_, value)| is_set(value)).map(|(name, _)| name.clone())
}

/// Whether a member carries something: not `null`, `false`, `[]` or `{}`.
fn is_set(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null | serde_json::Value::Bool(false) => false,
        serde_json::Value::Array(items) => !items.is_empty(),
        serde_json::Value::Object(members) => !members.is_empty(),
        _ => true,
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn default_modes() -> Vec<String> {
    vec![CARD_MODE.to_owned()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card_json() -> serde_json::Value {
        let key = molt_protocol::SigningKey::from_bytes(&[3; 32]).public_key();
        serde_json::json!({
            "name": "Translator",
            "description": "translates",
            "version": "4",
            "capabilities": {},
            "skills": [{"id": "translate.text", "name": "translate.text", "description": "", "tags": ["nlp"], "version": "1"}],
            "defaultInputModes": ["application/json"],
            "defaultOutputModes": ["application/json"],
            "molt": {"id": AgentId::from_inception_key(&key).to_string(), "public_key": hex::encode(key.as_bytes()), "visibility": "unlisted"}
        })
    }

    fn import(value: &serde_json::Value) -> Result<ImportedCard, CardError> {
        ImportedCard::from_json(value.to_string().as_bytes())
    }

    #[test]
    fn a_card_maps_skills_to_capabilities() {
        let imported = import(&card_json()).unwrap();
        assert_eq!(imported.profile.name, "Translator");
        assert_eq!(imported.profile.visibility, Visibility::Unlisted);
        assert_eq!(
            imported.profile.capabilities,
            [Capability { name: "translate.text".into(), version: "1".into(), tags: vec!["nlp".into()] }]
        );
    }

    #[test]
    fn what_has_no_place_is_refused_by_name() {
        let cases: [(&str, serde_json::Value); 6] = [
            ("/url", serde_json::json!("https://example.com")),
            ("/provider", serde_json::json!({"organization": "x"})),
            ("/capabilities", serde_json::json!({"streaming": true})),
            ("/defaultInputModes", serde_json::json!(["text/plain"])),
            ("/skills/0/description", serde_json::json!("does things")),
            ("/skills/0/examples", serde_json::json!(["hi"])),
        ];
        for (pointer, replacement) in cases {
            let mut card = card_json();
            let (parent, member) = pointer.rsplit_once('/').unwrap();
            card.pointer_mut(parent).unwrap().as_object_mut().unwrap().insert(member.to_owned(), replacement);
            let error = import(&card).unwrap_err();
            assert!(matches!(error, CardError::Unmappable(_)), "{pointer}: {error}");
            let named = pointer.trim_start_matches('/').replace("/0/", "[0].");
            assert!(error.to_string().contains(&named), "{pointer}: {error}");
        }
    }

    #[test]
    fn unknown_members_and_foreign_keys_are_refused() {
        let mut card = card_json();
        card["colour"] = serde_json::json!("blue");
        assert!(matches!(import(&card), Err(CardError::Invalid(_))));
        let mut card = card_json();
        card["molt"]["public_key"] = serde_json::json!(hex::encode([9; 32]));
        assert!(matches!(import(&card), Err(CardError::NotDerived | CardError::PublicKey)));
        assert!(matches!(ImportedCard::from_json(b"{\"name\":"), Err(CardError::Malformed(_))));
    }
}
