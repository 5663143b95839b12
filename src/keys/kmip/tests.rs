//! The provider's logic against an in-memory key manager (`fake.rs`) that
//! behaves as the test says; the wire itself is tested against PyKMIP
//! (tests/it/key_providers.rs).

use std::sync::Arc;
use std::sync::Mutex;

use kmip_protocol::types::common::Operation;

use super::fake::{Behaviour, FakeKmip};
use super::*;
use crate::TenantId;

fn provider(b: Behaviour) -> (KmipProvider, Arc<FakeKmip>) {
    let fake = Arc::new(FakeKmip::new(b));
    let p = KmipProvider::with_link("fake:5696".into(), Box::new(fake.clone()));
    (p, fake)
}

fn key(id: &str) -> KeyRef {
    KeyRef::parse(&format!("kmip:{id}")).unwrap()
}

fn ctx() -> WrapContext {
    WrapContext::tdk(&TenantId::new("acme").unwrap(), 1)
}

/// Objects the fake holds in `group`.
fn in_group(fake: &FakeKmip, group: &str) -> Vec<fake::Object> {
    fake.objects()
        .into_iter()
        .filter(|o| o.groups.iter().any(|g| g == group))
        .collect()
}

async fn assert_destroyed_with_a_time(p: &KmipProvider, k: &KeyRef) {
    let state = p.describe(k).await.unwrap().state;
    assert!(
        matches!(
            state,
            KeyState::Destroyed {
                destroyed_at: Some(_)
            }
        ),
        "{state:?}"
    );
}

// --- Unique Names, Object Groups, paged Locate ------------------------------

/// A key manager that refuses a Name another object carries accepts a
/// key's whole life: every object has Names of its own, the family shares
/// one Object Group.
#[tokio::test]
async fn every_object_has_a_name_of_its_own_and_the_family_a_group() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    p.rotate(&k).await.unwrap();
    p.rotate(&k).await.unwrap();
    assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    let d = p.destroy(&k, 7).await.unwrap();
    assert_eq!(d.objects.len(), 3);
    // The tombstone is all that is left: in the group, with a unique name.
    let left = in_group(&fake, "custos-key/acme");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].names[0].starts_with("acme@destroyed@"), "{left:?}");
    assert_eq!(left[0].names.len(), 1);
}

#[tokio::test]
async fn versions_are_named_by_number_and_grouped() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    p.rotate(&k).await.unwrap();
    let mut names: Vec<_> = fake
        .objects()
        .into_iter()
        .map(|o| (o.names, o.groups))
        .collect();
    names.sort();
    let one = |n: &str| (vec![n.to_owned()], vec!["custos-key/acme".to_owned()]);
    // Besides the versions, the server's marker (in a group of its own).
    let marker = names.pop().unwrap();
    assert!(marker.0[0].starts_with("custos-server/"), "{marker:?}");
    assert_eq!(marker.1, vec!["custos-server".to_owned()]);
    assert_eq!(names, vec![one("acme@v1"), one("acme@v2")]);
}

/// A family longer than one Locate page is read whole: the current version
/// is the newest, and destroy reaches every version.
#[tokio::test]
async fn a_family_longer_than_a_page_is_read_whole() {
    let (mut p, fake) = provider(Behaviour::default());
    p.locate_page = 3;
    let k = key("name/big");
    p.create_key(&k).await.unwrap();
    let (dk, first) = p.generate_data_key(&k, &ctx()).await.unwrap();
    for _ in 0..9 {
        p.rotate(&k).await.unwrap();
    }
    let info = p.describe(&k).await.unwrap();
    let newest = fake
        .objects()
        .into_iter()
        .find(|o| o.names == ["big@v10"])
        .unwrap();
    assert_eq!(info.current_version.as_deref(), Some(newest.uid.as_str()));
    let (_, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_eq!(w.key_version.as_deref(), Some(newest.uid.as_str()));
    // The oldest version, on the last page, still unwraps.
    assert_eq!(p.unwrap(&k, &first, &ctx()).await.unwrap(), dk);
    let d = p.destroy(&k, 7).await.unwrap();
    assert_eq!(d.objects.len(), 10);
    assert_eq!(
        in_group(&fake, "custos-key/big").len(),
        1,
        "only the tombstone"
    );
}

/// A key manager whose listing moves between two pages (another client
/// deletes an object already listed, so later ones move up a place) makes
/// the read begin again rather than skip an object.
#[tokio::test]
async fn a_listing_that_moves_between_pages_is_read_again() {
    struct Moving {
        fake: Arc<FakeKmip>,
        intruder: Mutex<Option<String>>,
    }
    #[async_trait]
    impl Link for Arc<Moving> {
        async fn call(&self, req: Request) -> Result<Response, WireError> {
            if matches!(
                req,
                Request::Locate {
                    offset_items: 2,
                    ..
                }
            ) && let Some(uid) = self.intruder.lock().unwrap().take()
            {
                self.fake.remove(&uid);
            }
            self.fake.call(req).await
        }
    }
    let fake = Arc::new(FakeKmip::new(Behaviour::default()));
    let moving = Arc::new(Moving {
        fake: fake.clone(),
        intruder: Mutex::new(None),
    });
    let mut p = KmipProvider::with_link("fake:5696".into(), Box::new(moving.clone()));
    p.locate_page = 3;
    let k = key("name/moving");
    p.create_key(&k).await.unwrap();
    for _ in 0..4 {
        p.rotate(&k).await.unwrap();
    }
    // Another client's object in the group, the newest: listed first.
    let intruder = fake.insert(&["someone-else"], &["custos-key/moving"], State::Active);
    *moving.intruder.lock().unwrap() = Some(intruder);
    let d = p.destroy(&k, 7).await.unwrap();
    assert_eq!(d.objects.len(), 5, "{d:?}");
    assert!(
        moving.intruder.lock().unwrap().is_none(),
        "the listing never moved"
    );
}

/// Families made before Object Groups (every object named `<n>`, on a
/// server that allowed it) keep working: read, rotated (the new version in
/// the new scheme), unwrapped and destroyed.
#[tokio::test]
async fn families_of_the_earlier_scheme_keep_working() {
    let (p, fake) = provider(Behaviour {
        unique_names: false,
        ..Behaviour::default()
    });
    let k = key("name/old");
    let v1 = fake.insert(&["old", "old@v1"], &[], State::Active);
    let v2 = fake.insert(&["old", "old@v2"], &[], State::Active);
    // Someone else's object carrying the Name: not a version.
    fake.insert(&["old"], &[], State::Active);
    assert_eq!(
        p.describe(&k).await.unwrap().current_version,
        Some(v2.clone())
    );
    let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_eq!(w.key_version, Some(v2));
    p.rotate(&k).await.unwrap();
    let v3 = p.describe(&k).await.unwrap().current_version.unwrap();
    assert_ne!(v3, v1);
    assert_eq!(in_group(&fake, "custos-key/old").len(), 1);
    assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    let d = p.destroy(&k, 7).await.unwrap();
    assert_eq!(d.objects.len(), 3);
    assert_destroyed_with_a_time(&p, &k).await;
}

/// A tombstone of the earlier scheme (or anyone's) still makes the key
/// read as destroyed and refuse use; only custos's own record dates it.
#[tokio::test]
async fn tombstones_of_the_earlier_scheme_still_count() {
    let (p, fake) = provider(Behaviour {
        unique_names: false,
        ..Behaviour::default()
    });
    fake.insert(
        &["gone", "gone@destroyed@1700000000"],
        &[],
        State::Compromised,
    );
    let k = key("name/gone");
    assert_eq!(
        p.describe(&k).await.unwrap().state,
        KeyState::Destroyed { destroyed_at: None }
    );
    assert!(matches!(
        p.create_key(&k).await,
        Err(KeyError::Destroyed { .. })
    ));
    let uid = fake.insert(&["x"], &[], State::Active);
    fake.insert(
        &[
            &format!("custos-uid/{uid}"),
            &format!("custos-uid/{uid}@destroyed@1700000001"),
        ],
        &[],
        State::Compromised,
    );
    // A tombstone beside a live object: an interrupted destruction.
    let e = p.generate_data_key(&key(&uid), &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
}

// --- kmip:<uid> tombstones ---------------------------------------------------

/// Shredding a `kmip:<uid>` key again reuses its tombstone, on a server that
/// deletes destroyed objects and on one that keeps them.
#[tokio::test]
async fn a_uid_key_shredded_again_reuses_its_tombstone() {
    for keep_destroyed in [false, true] {
        let (p, fake) = provider(Behaviour {
            keep_destroyed,
            ..Behaviour::default()
        });
        let uid = fake.insert(&["customer-key"], &[], State::Active);
        let k = key(&uid);
        let first = p.destroy(&k, 7).await.unwrap();
        let second = p.destroy(&k, 7).await.unwrap();
        let third = p.destroy(&k, 7).await.unwrap();
        let tombs = in_group(&fake, &format!("custos-uid/{uid}"));
        assert_eq!(tombs.len(), 1, "keep_destroyed {keep_destroyed}: {tombs:?}");
        assert_eq!(first.effective_at, second.effective_at);
        assert_eq!(first.effective_at, third.effective_at);
        assert_destroyed_with_a_time(&p, &k).await;
    }
}

/// A destruction interrupted after its tombstone (the object still Active)
/// refuses every use, and the next shred finishes it with that tombstone:
/// custos's own, from its record, revoked as a fresh one would be.
#[tokio::test]
async fn an_interrupted_uid_key_destruction_is_finished_with_its_tombstone() {
    let (p, fake) = provider(Behaviour::default());
    let uid = fake.insert(&["customer-key"], &[], State::Active);
    let k = key(&uid);
    p.describe(&k).await.unwrap();
    // The crash came after the tombstone's Create, before its Revoke.
    let tomb = fake.insert(
        &[&format!("custos-uid/{uid}@destroyed@1700000000")],
        &[&format!("custos-uid/{uid}")],
        State::PreActive,
    );
    p.record(&k, |r| {
        r.tombstones.insert(tomb.clone(), 1_700_000_000);
    })
    .unwrap();
    assert_eq!(
        p.describe(&k).await.unwrap().state.name(),
        "destroy_incomplete"
    );
    let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    // custos's own tombstone: its own shred stopped half-way.
    assert!(e.to_string().contains("run the shred again"), "{e}");
    let d = p.destroy(&k, 7).await.unwrap();
    assert_eq!(d.effective_at, time(1_700_000_000).unwrap());
    assert_eq!(d.objects, vec![uid.clone()]);
    let tombs = in_group(&fake, &format!("custos-uid/{uid}"));
    assert_eq!(tombs.len(), 1);
    assert_eq!(
        tombs[0].state,
        State::Compromised,
        "the reused tombstone is revoked"
    );
}

// --- Objects custos did not make (review #15, finding 1) ----------------------

/// Someone with the same KMIP credentials plants `<n>@v<huge>` in the
/// key's group, with a value they know: custos keeps wrapping under the
/// newest version it created, a rotation numbers past the planted one, and
/// a shred destroys it with the rest.
#[tokio::test]
async fn a_planted_higher_version_is_never_wrapped_under() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let mine = p.describe(&k).await.unwrap().current_version.unwrap();
    let planted = fake.insert(&["acme@v1000"], &["custos-key/acme"], State::Active);
    let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_eq!(w.key_version.as_deref(), Some(mine.as_str()));
    let w2 = p.wrap(&k, &dk, &ctx()).await.unwrap();
    assert_eq!(w2.key_version.as_deref(), Some(mine.as_str()));
    assert_eq!(
        p.describe(&k).await.unwrap().current_version.as_deref(),
        Some(mine.as_str())
    );
    // Rotation: the next after custos's highest, current from now on.
    p.rotate(&k).await.unwrap();
    let rotated = p.describe(&k).await.unwrap().current_version.unwrap();
    let names = |uid: &str| {
        fake.objects()
            .into_iter()
            .find(|o| o.uid == uid)
            .map(|o| o.names)
            .unwrap()
    };
    assert_eq!(names(&rotated), vec!["acme@v2".to_owned()]);
    let (_, w3) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_eq!(w3.key_version.as_deref(), Some(rotated.as_str()));
    // A shred destroys every object in the family, the planted one too.
    let d = p.destroy(&k, 7).await.unwrap();
    assert!(d.objects.contains(&planted), "{d:?}");
    assert_eq!(d.objects.len(), 3);
}

/// A key that only objects custos did not make claim versions of (its own
/// were deleted behind its back) is refused by name, never adopted.
#[tokio::test]
async fn a_key_with_only_planted_versions_is_refused() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let mine = p.describe(&k).await.unwrap().current_version.unwrap();
    fake.remove(&mine);
    let planted = fake.insert(&["acme@v2"], &["custos-key/acme"], State::Active);
    let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
    assert!(e.to_string().contains(&planted), "{e}");
    assert!(matches!(
        p.create_key(&k).await,
        Err(KeyError::AccessDenied { .. })
    ));
}

/// A key first met with versions on the server (made before the record, or
/// by the customer) is adopted as found, once; what is planted later is not.
#[tokio::test]
async fn a_key_met_for_the_first_time_is_adopted_once() {
    let (p, fake) = provider(Behaviour::default());
    let v1 = fake.insert(&["old@v1"], &["custos-key/old"], State::Active);
    let k = key("name/old");
    let (_, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_eq!(w.key_version, Some(v1.clone()));
    fake.insert(&["old@v2"], &["custos-key/old"], State::Active);
    let (_, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_eq!(w.key_version, Some(v1));
}

/// `create_key` never adopts: objects already under the name that custos
/// has no record of are refused by identifier. Use of the key adopts them
/// (logged), once; after that, create_key finds the key made.
#[tokio::test]
async fn create_key_never_adopts() {
    let (p, fake) = provider(Behaviour::default());
    let v1 = fake.insert(&["old@v1"], &["custos-key/old"], State::Active);
    let k = key("name/old");
    let e = p.create_key(&k).await.unwrap_err();
    assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("{v1:?}")), "{e}");
    assert_eq!(p.pins.get("name/old", "k").unwrap(), None);
    p.describe(&k).await.unwrap();
    let info = p.create_key(&k).await.unwrap();
    assert_eq!(info.current_version, Some(v1));
}

/// The record survives the process: a new provider on the same state file
/// still refuses the planted version, also when it names the server
/// otherwise (the record is keyed by key id: a changed server string
/// adopts nothing).
#[tokio::test]
async fn the_record_in_the_state_directory_outlives_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("kmip-objects.json");
    let fake = Arc::new(FakeKmip::new(Behaviour::default()));
    let open = |server: &str| {
        KmipProvider::with_link(server.into(), Box::new(fake.clone()))
            .with_object_record(record.clone())
    };
    let k = key("name/acme");
    open("kms.internal:5696").create_key(&k).await.unwrap();
    fake.insert(&["acme@v9"], &["custos-key/acme"], State::Active);
    let (_, w) = open("10.0.0.7:5696")
        .generate_data_key(&k, &ctx())
        .await
        .unwrap();
    let mine = fake
        .objects()
        .into_iter()
        .find(|o| o.names == ["acme@v1"])
        .unwrap();
    assert_eq!(w.key_version, Some(mine.uid));
}

/// A planted tombstone makes the key refuse use (fail-safe), and never
/// dates a destruction: the shred's time is custos's own.
#[tokio::test]
async fn a_planted_tombstone_refuses_use_and_dates_nothing() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let planted = fake.insert(
        &["acme@destroyed@1000"],
        &["custos-key/acme"],
        State::Compromised,
    );
    let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    // Never "run the shred again": that would destroy the live key.
    let message = e.to_string();
    assert!(message.contains(&format!("{planted:?}")), "{message}");
    assert!(message.contains("custos did not leave"), "{message}");
    assert!(!message.contains("shred again"), "{message}");
    assert_eq!(
        p.describe(&k).await.unwrap().state,
        KeyState::Other {
            name: "foreign_tombstone".into()
        }
    );
    let e = p.create_key(&k).await.unwrap_err();
    assert!(e.to_string().contains("custos did not leave"), "{e}");
    let before = Utc::now().timestamp();
    let d = p.destroy(&k, 7).await.unwrap();
    assert!(d.effective_at.timestamp() >= before, "{d:?}");
    assert_eq!(
        p.describe(&k).await.unwrap().state,
        KeyState::Destroyed {
            destroyed_at: Some(d.effective_at)
        }
    );
}

// --- The material is pinned, not the identifier (issue #15, round 2) -------

/// PyKMIP gives a destroyed top identifier to the next object: another
/// client that destroys custos's version and Registers a key it knows gets
/// the same identifier. custos's check value of the material refuses it,
/// whether or not custos saw the identifier gone in between.
#[tokio::test]
async fn a_reused_identifier_holding_other_material_is_never_wrapped_under() {
    for seen_gone in [false, true] {
        let (p, fake) = provider(Behaviour {
            reuse_ids: true,
            ..Behaviour::default()
        });
        let k = key("name/acme");
        p.create_key(&k).await.unwrap();
        let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
        let mine = w.key_version.clone().unwrap();
        fake.remove(&mine);
        if seen_gone {
            let state = p.describe(&k).await.unwrap().state;
            assert!(matches!(state, KeyState::Destroyed { .. }), "{state:?}");
        }
        let planted = fake.insert(&["acme@v1"], &["custos-key/acme"], State::Active);
        assert_eq!(planted, mine, "the fake reuses identifiers as PyKMIP does");
        // Refused at every wrap: the check value is asked each time.
        for _ in 0..2 {
            let e = p.wrap(&k, &dk, &ctx()).await.unwrap_err();
            assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
            assert!(e.to_string().contains(&format!("{mine:?}")), "{e}");
            let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
            assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
        }
        // The old envelope does not open under the other material.
        let e = p.unwrap(&k, &w, &ctx()).await.unwrap_err();
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
        // A rotation makes a version custos pins, and wraps go on.
        p.rotate(&k).await.unwrap();
        let w2 = p.wrap(&k, &dk, &ctx()).await.unwrap();
        assert_ne!(w2.key_version.as_ref(), Some(&mine));
    }
}

/// A version recorded by the first round (no check value) is never wrapped
/// under again: an envelope from the store vouches for nothing (whoever can
/// write the store and use the key manager can make one under any object).
/// Old envelopes still open; a rotation makes a version custos pins.
#[tokio::test]
async fn a_version_recorded_without_a_check_value_is_not_wrapped_under_until_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("kmip-objects.json");
    let fake = Arc::new(FakeKmip::new(Behaviour::default()));
    let open = || {
        KmipProvider::with_link("fake:5696".into(), Box::new(fake.clone()))
            .with_object_record(record.clone())
    };
    let k = key("name/acme");
    open().create_key(&k).await.unwrap();
    let (dk, w) = open().generate_data_key(&k, &ctx()).await.unwrap();
    // As the first round wrote it: no check values.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    json["keys"]["name/acme"]
        .as_object_mut()
        .unwrap()
        .remove("checks")
        .unwrap();
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();
    let e = open().wrap(&k, &dk, &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("check value"), "{e}");
    assert_eq!(open().unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    let e = open().wrap(&k, &dk, &ctx()).await.unwrap_err();
    assert!(e.to_string().contains("check value"), "{e}");
    open().rotate(&k).await.unwrap();
    let w2 = open().wrap(&k, &dk, &ctx()).await.unwrap();
    assert_ne!(w2.key_version, w.key_version);
    assert_eq!(open().unwrap(&k, &w, &ctx()).await.unwrap(), dk);
}

// --- Which key manager holds a key ------------------------------------------

/// Two key managers that number their objects alike (PyKMIP counts from 1)
/// and one record: pointed at the wrong one, custos judges nothing of the
/// key (no destruction certified, no identifier marked dead, none of that
/// server's objects touched); pointed back, the key is whole and shreds.
#[tokio::test]
async fn a_key_is_never_judged_on_another_key_manager() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("kmip-objects.json");
    let right = Arc::new(FakeKmip::new(Behaviour::default()));
    let wrong = Arc::new(FakeKmip::new(Behaviour::default()));
    let on = |fake: &Arc<FakeKmip>| {
        KmipProvider::with_link("fake:5696".into(), Box::new(fake.clone()))
            .with_object_record(record.clone())
    };
    let k = key("name/acme");
    on(&right).create_key(&k).await.unwrap();
    let (dk, w) = on(&right).generate_data_key(&k, &ctx()).await.unwrap();
    let version = w.key_version.clone().unwrap();
    // The wrong server holds other objects under the same identifiers.
    for n in 0..3 {
        wrong.insert(&[&format!("payroll-{n}")], &[], State::Active);
    }
    assert!(wrong.objects().iter().any(|o| o.uid == version));
    let before = std::fs::read(&record).unwrap();
    let e = on(&wrong).describe(&k).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("marker"), "{e}");
    for e in [
        on(&wrong).destroy(&k, 7).await.unwrap_err(),
        on(&wrong).wrap(&k, &dk, &ctx()).await.unwrap_err(),
        on(&wrong).unwrap(&k, &w, &ctx()).await.unwrap_err(),
        on(&wrong).rotate(&k).await.unwrap_err(),
        on(&wrong).create_key(&k).await.unwrap_err(),
    ] {
        assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    }
    assert_eq!(std::fs::read(&record).unwrap(), before, "record changed");
    assert!(
        wrong.objects().iter().all(|o| o.state == State::Active),
        "{:?}",
        wrong.objects()
    );
    assert_eq!(wrong.objects().len(), 3);
    // Back on its own server the key is whole, and its shred destroys it.
    assert_eq!(on(&right).unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    let d = on(&right).destroy(&k, 7).await.unwrap();
    assert_eq!(d.objects, vec![version.clone()]);
    assert!(!right.objects().iter().any(|o| o.uid == version));
}

/// A record written before markers binds each key to the server of its
/// next use, unless some of its objects are gone there: then custos cannot
/// tell a destruction from a wrong server, and refuses to judge.
#[tokio::test]
async fn a_record_from_before_markers_binds_where_nothing_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("kmip-objects.json");
    let right = Arc::new(FakeKmip::new(Behaviour::default()));
    let wrong = Arc::new(FakeKmip::new(Behaviour::default()));
    let on = |fake: &Arc<FakeKmip>| {
        KmipProvider::with_link("fake:5696".into(), Box::new(fake.clone()))
            .with_object_record(record.clone())
    };
    let as_before_markers = || {
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        json["format"] = "custos-kmip-objects-v2".into();
        json.as_object_mut().unwrap().remove("servers");
        json["keys"]["name/acme"]
            .as_object_mut()
            .unwrap()
            .remove("server")
            .unwrap();
        std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();
    };
    let k = key("name/acme");
    on(&right).create_key(&k).await.unwrap();
    as_before_markers();
    let e = on(&wrong).describe(&k).await.unwrap_err();
    assert!(e.to_string().contains("before it bound keys"), "{e}");
    let json = std::fs::read_to_string(&record).unwrap();
    assert!(!json.contains("dead"), "{json}");
    // Where every object is there, the key is bound, and stays bound.
    assert_eq!(
        on(&right).describe(&k).await.unwrap().state,
        KeyState::Enabled
    );
    let json = std::fs::read_to_string(&record).unwrap();
    assert!(
        json.contains("\"server\"") && json.contains("custos-kmip-objects-v4"),
        "{json}"
    );
    let e = on(&wrong).describe(&k).await.unwrap_err();
    assert!(e.to_string().contains("marker"), "{e}");
}

/// Versions (and every object custos makes) are created Sensitive, which
/// a server that honours it never returns to a Get; a server without KMIP
/// 1.4 gets them without it, once asked.
#[tokio::test]
async fn objects_are_created_sensitive_where_the_server_takes_it() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    p.rotate(&k).await.unwrap();
    assert!(
        fake.objects().iter().all(|o| o.sensitive),
        "{:?}",
        fake.objects()
    );
    let (p, fake) = provider(Behaviour {
        refuses_sensitive: true,
        ..Behaviour::default()
    });
    p.create_key(&k).await.unwrap();
    fake.clear_log();
    p.rotate(&k).await.unwrap();
    let creates = fake.log().iter().filter(|op| *op == "Create").count();
    assert_eq!(creates, 1, "asked again with Sensitive: {:?}", fake.log());
    assert!(fake.objects().iter().all(|o| !o.sensitive));
}

/// A version deleted behind custos whose identifier the server gives to
/// another client's live object: the shred tells the object by its
/// material, leaves it alone, and neither blocks on it nor lists it. Run
/// again (the identifier is now dead), the same.
#[tokio::test]
async fn an_identifier_given_to_another_object_is_left_alone_by_a_shred() {
    let (p, fake) = provider(Behaviour {
        reuse_ids: true,
        ..Behaviour::default()
    });
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    p.rotate(&k).await.unwrap();
    let newest = p.current(&k).await.unwrap().uid;
    fake.remove(&newest);
    p.describe(&k).await.unwrap();
    let other = fake.insert(&["payroll"], &[], State::Active);
    assert_eq!(other, newest);
    for _ in 0..2 {
        let d = p.destroy(&k, 7).await.unwrap();
        assert!(!d.objects.contains(&newest), "{d:?}");
        let o = fake.objects().into_iter().find(|o| o.uid == other).unwrap();
        assert_eq!(
            o.state,
            State::Active,
            "another client's object was touched"
        );
    }
}

/// Other material under a version's identifier that still carries the
/// version's Name is not taken for another object on one answer: the
/// shred stops, naming it, and destroys nothing.
#[tokio::test]
async fn other_material_under_the_versions_name_stops_the_shred() {
    let (p, fake) = provider(Behaviour {
        reuse_ids: true,
        ..Behaviour::default()
    });
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let mine = p.current(&k).await.unwrap().uid;
    fake.remove(&mine);
    let planted = fake.insert(&["acme@v1"], &["custos-key/acme"], State::Active);
    assert_eq!(planted, mine);
    let e = p.destroy(&k, 7).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("another key check value"), "{e}");
    assert!(fake.objects().iter().any(|o| o.uid == planted));
}

/// An identifier wrongly marked dead (say, by a shred that ran while DNS
/// sent custos to another key manager) never lets a live version pass for
/// a destroyed one: the shred asks again, and destroys what answers with
/// the version's material.
#[tokio::test]
async fn a_wrong_dead_mark_never_spares_a_live_version() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let (_, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    let version = w.key_version.clone().unwrap();
    p.record(&k, |r| {
        r.dead.insert(version.clone());
    })
    .unwrap();
    let d = p.destroy(&k, 7).await.unwrap();
    assert!(d.objects.contains(&version), "{d:?}");
    assert!(!fake.objects().iter().any(|o| o.uid == version));
}

/// A live identifier under which an object neither gives the version's
/// material (it is Deactivated) nor carries its Name: custos's version
/// renamed to survive the shred, or another object; the shred stops,
/// naming it, and destroys nothing on a guess.
#[tokio::test]
async fn a_renamed_deactivated_version_stops_the_shred() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    p.rotate(&k).await.unwrap();
    let old = fake
        .objects()
        .into_iter()
        .find(|o| o.names == ["acme@v1"])
        .unwrap()
        .uid;
    p.disable(&k).await.unwrap();
    fake.rename(&old, &["not-custos"], &[]);
    let e = p.destroy(&k, 7).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("{old:?}")), "{e}");
    assert!(fake.objects().iter().any(|o| o.uid == old));
}

/// The identifier given to other material between the check and the
/// Encrypt of a wrap: the second check value refuses the envelope.
#[tokio::test]
async fn material_swapped_during_a_wrap_is_caught_by_the_second_check() {
    struct SwapsAtEncrypt {
        fake: Arc<FakeKmip>,
        encrypts: Mutex<u32>,
    }
    #[async_trait]
    impl Link for SwapsAtEncrypt {
        async fn call(&self, req: Request) -> Result<Response, WireError> {
            if let Request::Crypt {
                decrypt: false,
                uid,
                data,
                ..
            } = &req
                && data.iter().any(|b| *b != 0)
            {
                let n = {
                    let mut n = self.encrypts.lock().unwrap();
                    *n += 1;
                    *n
                };
                // Check values encrypt the zero block; before the first
                // other Encrypt (the wrapping key's), the object is
                // replaced under the same identifier.
                if n == 1 {
                    self.fake.remove(uid);
                    let again = self
                        .fake
                        .insert(&["acme@v1"], &["custos-key/acme"], State::Active);
                    assert_eq!(&again, uid);
                }
            }
            self.fake.call(req).await
        }
    }
    let fake = Arc::new(FakeKmip::new(Behaviour {
        reuse_ids: true,
        ..Behaviour::default()
    }));
    let link = SwapsAtEncrypt {
        fake: fake.clone(),
        encrypts: Mutex::new(0),
    };
    let p = KmipProvider::with_link("fake:5696".into(), Box::new(link));
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
    assert!(e.to_string().contains("check value changed"), "{e}");
}
/// Another key's version, renamed into this key's group, is never taken
/// for a version of this key: a shred of this key leaves it alone.
#[tokio::test]
async fn a_shred_never_destroys_another_keys_version() {
    let (p, fake) = provider(Behaviour::default());
    let (a, b) = (key("name/a"), key("name/b"));
    p.create_key(&a).await.unwrap();
    p.create_key(&b).await.unwrap();
    let (dk, w) = p.generate_data_key(&b, &ctx()).await.unwrap();
    let bs = w.key_version.clone().unwrap();
    fake.rename(&bs, &["a@v7"], &["custos-key/a"]);
    let d = p.destroy(&a, 7).await.unwrap();
    assert!(!d.objects.contains(&bs), "{d:?}");
    assert_eq!(p.unwrap(&b, &w, &ctx()).await.unwrap(), dk);
    assert_eq!(p.describe(&b).await.unwrap().state, KeyState::Enabled);
}

/// A key manager that denies permission for the operations `target` picks
/// on object `uid` (another client's object custos may not touch).
struct Denying {
    fake: Arc<FakeKmip>,
    uid: Arc<Mutex<String>>,
    target: fn(&Request) -> Option<&String>,
}

#[async_trait]
impl Link for Denying {
    async fn call(&self, req: Request) -> Result<Response, WireError> {
        if (self.target)(&req).is_some_and(|u| *u == *self.uid.lock().unwrap()) {
            return Err(WireError::Failed {
                reason: Some(ResultReason::PermissionDenied),
                message: "not yours".into(),
            });
        }
        self.fake.call(req).await
    }
}

/// A provider over a fake key manager that denies what `target` picks on
/// the object named in the returned cell (empty: nothing denied).
fn denying(
    b: Behaviour,
    target: fn(&Request) -> Option<&String>,
) -> (KmipProvider, Arc<FakeKmip>, Arc<Mutex<String>>) {
    let fake = Arc::new(FakeKmip::new(b));
    let uid = Arc::new(Mutex::new(String::new()));
    let link = Denying {
        fake: fake.clone(),
        uid: uid.clone(),
        target,
    };
    let p = KmipProvider::with_link("fake:5696".into(), Box::new(link));
    (p, fake, uid)
}

/// An object custos did not create, named as a version, that refuses its
/// Revoke and Destroy does not block the shred of custos's own versions,
/// and is not listed as destroyed.
#[tokio::test]
async fn a_planted_object_that_refuses_destroy_does_not_block_the_shred() {
    let (p, fake, refused) = denying(Behaviour::default(), |req| match req {
        Request::Revoke { uid, .. } | Request::Destroy(uid) => Some(uid),
        _ => None,
    });
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let mine = p.describe(&k).await.unwrap().current_version.unwrap();
    let planted = fake.insert(&["acme@v5"], &["custos-key/acme"], State::Active);
    *refused.lock().unwrap() = planted.clone();
    let d = p.destroy(&k, 7).await.unwrap();
    assert_eq!(d.objects, vec![mine.clone()]);
    assert!(!p.object_present(&k, &mine).await.unwrap());
    assert!(p.object_present(&k, &planted).await.unwrap());
}

/// Objects planted as `<n>@v4294967295` and as the next number do not
/// block rotation: it numbers from custos's highest recorded version and
/// skips numbers already claimed.
#[tokio::test]
async fn planted_version_numbers_do_not_block_rotation() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    fake.insert(&["acme@v4294967295"], &["custos-key/acme"], State::Active);
    fake.insert(&["acme@v2"], &["custos-key/acme"], State::Active);
    p.rotate(&k).await.unwrap();
    let current = p.describe(&k).await.unwrap().current_version.unwrap();
    let named = fake
        .objects()
        .into_iter()
        .find(|o| o.uid == current)
        .unwrap();
    assert_eq!(named.names, vec!["acme@v3".to_owned()]);
}

/// A listed object custos may not read, which it did not create, is
/// skipped in use; a shred fails on it, naming the object and the group.
#[tokio::test]
async fn an_unreadable_object_is_skipped_in_use_and_named_by_a_shred() {
    let (p, fake, hidden) = denying(Behaviour::default(), |req| match req {
        Request::GetAttributes(uid) => Some(uid),
        _ => None,
    });
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let planted = fake.insert(&["acme@v9"], &["custos-key/acme"], State::Active);
    *hidden.lock().unwrap() = planted.clone();
    let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    let e = p.destroy(&k, 7).await.unwrap_err();
    let message = e.to_string();
    assert!(message.contains(&format!("{planted:?}")), "{message}");
    assert!(message.contains("custos-key/acme"), "{message}");
}

// --- Absence is no proof (finding 2) ----------------------------------------------

/// A version renamed and moved out of the key's group (by anyone with
/// credentials) is still the key's: found by its identifier, it unwraps,
/// the key does not read as destroyed, and a shred destroys it.
#[tokio::test]
async fn a_version_moved_out_of_the_group_is_still_found_and_destroyed() {
    for keep_destroyed in [false, true] {
        let (p, fake) = provider(Behaviour {
            keep_destroyed,
            ..Behaviour::default()
        });
        let k = key("name/acme");
        p.create_key(&k).await.unwrap();
        let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
        let uid = w.key_version.clone().unwrap();
        fake.rename(&uid, &["elsewhere"], &["another-group"]);
        assert_eq!(p.describe(&k).await.unwrap().state, KeyState::Enabled);
        assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
        let d = p.destroy(&k, 7).await.unwrap();
        assert_eq!(d.objects, vec![uid.clone()]);
        let left = fake.objects().into_iter().find(|o| o.uid == uid);
        assert!(
            left.is_none_or(|o| is_destroyed(o.state)),
            "keep_destroyed {keep_destroyed}"
        );
        assert_destroyed_with_a_time(&p, &k).await;
    }
}

/// An envelope of a version custos knows, which the server no longer holds
/// (deleted out of band), reads as destroyed, not as a foreign envelope.
#[tokio::test]
async fn an_envelope_of_a_version_gone_by_identifier_is_destroyed() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let (_, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    p.rotate(&k).await.unwrap();
    fake.remove(w.key_version.as_deref().unwrap());
    let e = p.unwrap(&k, &w, &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::Destroyed { .. }), "{e:?}");
}

/// A shred that finds nothing by Locate, of a key custos knows, proves the
/// destruction by identifier; with an object it knows still there (moved
/// out of the group after the destroy), it does not claim one.
#[tokio::test]
async fn a_destroyed_key_is_proven_gone_by_identifier() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let uid = p.describe(&k).await.unwrap().current_version.unwrap();
    // Someone moves the version away: no Locate lists it any more.
    fake.rename(&uid, &["hidden"], &[]);
    // Before: absence by Locate read as "destroyed". Now the version, asked
    // for by its identifier, is Active: the key is usable, not destroyed.
    assert_eq!(p.describe(&k).await.unwrap().state, KeyState::Enabled);
    // A Destroy that the server ignores: the proof by identifier fails.
    struct IgnoresDestroy(Arc<FakeKmip>);
    #[async_trait]
    impl Link for IgnoresDestroy {
        async fn call(&self, req: Request) -> Result<Response, WireError> {
            match req {
                Request::Destroy(_) => Ok(Response::Done),
                other => self.0.call(other).await,
            }
        }
    }
    let mut q = KmipProvider::with_link("fake:5696".into(), Box::new(IgnoresDestroy(fake.clone())));
    q.pins = std::mem::replace(&mut { p }.pins, pins::Pins::in_memory());
    let e = q.destroy(&k, 7).await.unwrap_err();
    assert!(e.to_string().contains(&uid), "{e}");
}

// --- Envelope format 2 -------------------------------------------------------

fn format_and_mode(w: &WrappedKey) -> (u8, u8) {
    (w.ciphertext[0], w.ciphertext[1])
}

/// New envelopes are format 2: CBC without padding where the server offers
/// it, CTR where it does not (PyKMIP), found out once.
#[tokio::test]
async fn new_envelopes_are_format_2() {
    for (cbc, mode) in [(true, 1), (false, 2)] {
        let (p, fake) = provider(Behaviour {
            cbc_without_padding: cbc,
            ..Behaviour::default()
        });
        let k = key("name/f2");
        p.create_key(&k).await.unwrap();
        for _ in 0..3 {
            let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
            assert_eq!(format_and_mode(&w), (2, mode));
            assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
        }
        // The refused CBC is asked once per process, not once per wrap;
        // the creation takes the key check value, each wrap takes it before
        // and after the wrapping key's Encrypt.
        let encrypts = fake.log().iter().filter(|o| *o == "Encrypt").count();
        // The server's marker adds two: at its creation, and asked afresh
        // after the version's Create.
        assert_eq!(encrypts, if cbc { 3 + 3 * 3 } else { 4 + 3 * 3 });
    }
}

/// Whatever byte of a format-2 envelope changes, unwrap makes the same
/// calls as for an intact one and answers invalid_ciphertext from the
/// local tag alone: the server accepts any 32 bytes, so neither its answer
/// nor an extra call says what was wrong.
#[tokio::test]
async fn a_tampered_format_2_envelope_makes_the_same_calls_and_one_answer() {
    for cbc in [true, false] {
        let (p, fake) = provider(Behaviour {
            cbc_without_padding: cbc,
            ..Behaviour::default()
        });
        let k = key("name/t");
        p.create_key(&k).await.unwrap();
        let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
        fake.clear_log();
        assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
        let good_calls = fake.log();
        let uid_len = u16::from_be_bytes([w.ciphertext[2], w.ciphertext[3]]) as usize;
        // From the IV on: the mode byte and the object change what is asked.
        for at in 4 + uid_len..w.ciphertext.len() {
            let mut bad = w.clone();
            bad.ciphertext[at] ^= 0x01;
            fake.clear_log();
            let e = p.unwrap(&k, &bad, &ctx()).await.unwrap_err();
            match &e {
                KeyError::InvalidCiphertext { message, .. } => {
                    assert_eq!(message, envelope::REFUSED, "byte {at}")
                }
                other => panic!("byte {at}: {other:?}"),
            }
            assert_eq!(fake.log(), good_calls, "byte {at}");
        }
    }
}

/// Envelopes of format 1 (CBC with PKCS#5 padding) still unwrap; a
/// tampered one is refused with the same words and the same calls whether
/// the server's padding check or the local tag refused it.
#[tokio::test]
async fn format_1_envelopes_still_unwrap() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/v1");
    p.create_key(&k).await.unwrap();
    let uid = p.describe(&k).await.unwrap().current_version.unwrap();
    let wk = SecretKey::generate();
    let dk = SecretKey::generate();
    let iv = [5u8; 16];
    let wk_ct = fake.encrypt_as_server(&uid, Cipher::CbcPkcs5, iv, wk.expose());
    assert_eq!(wk_ct.len(), 48);
    let w = WrappedKey {
        key_id: k.to_string(),
        key_version: Some(uid.clone()),
        ciphertext: envelope::tests::seal_v1(&uid, iv, &wk_ct, &wk, &dk, &ctx(), [3; 12]),
    };
    fake.clear_log();
    assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    let good_calls = fake.log();
    let wk_at = 1 + 2 + uid.len() + 16 + 2;
    // The middle case turns the last plaintext byte from 0x10 into 0x01:
    // padding the server accepts, a 47-byte answer. It must read exactly as
    // a refused padding does, or the answer is a padding oracle.
    for (what, at, flip) in [
        ("padding block", wk_at + 47, 0x01),
        ("padding valid but short", wk_at + 31, 0x11),
        ("seal", w.ciphertext.len() - 1, 0x01),
    ] {
        let mut bad = w.clone();
        bad.ciphertext[at] ^= flip;
        fake.clear_log();
        let e = p.unwrap(&k, &bad, &ctx()).await.unwrap_err();
        assert!(
            matches!(&e, KeyError::InvalidCiphertext { message, .. } if message == envelope::REFUSED),
            "{what}: {e:?}"
        );
        assert_eq!(fake.log(), good_calls, "{what}");
    }
}

// --- What a hostile or odd key manager can answer -----------------------------

/// Creation interrupted between Create and Activate: the next use makes a
/// new version rather than activate one whose material custos never
/// pinned (another client could have Registered a value it knows under
/// the identifier meanwhile); a shred destroys the orphan too.
#[tokio::test]
async fn a_version_left_pre_active_is_replaced_not_activated() {
    let (p, fake) = provider(Behaviour::default());
    let orphan = fake.insert(&["half@v1"], &["custos-key/half"], State::PreActive);
    let k = key("name/half");
    let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    assert_ne!(w.key_version.as_ref(), Some(&orphan));
    assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    assert_eq!(p.describe(&k).await.unwrap().state, KeyState::Enabled);
    let o = fake
        .objects()
        .into_iter()
        .find(|o| o.uid == orphan)
        .unwrap();
    assert_eq!(o.state, State::PreActive, "the orphan was activated");
    let d = p.destroy(&k, 7).await.unwrap();
    assert!(d.objects.contains(&orphan), "{d:?}");
    assert!(!fake.objects().iter().any(|o| o.uid == orphan));
}

/// Version names the server reports are parsed strictly: the largest
/// number cannot make rotation overflow, a sign or a leading zero is not a
/// version, and a key that is not AES-256 is not wrapped under.
#[tokio::test]
async fn odd_names_and_weak_keys_are_refused_without_panic() {
    let (p, fake) = provider(Behaviour::default());
    fake.insert(&["max@v4294967295"], &["custos-key/max"], State::Active);
    let e = p.rotate(&key("name/max")).await.unwrap_err();
    assert!(matches!(e, KeyError::Backend { .. }), "{e:?}");
    for odd in ["odd@v+5", "odd@v05", "odd@v", "odd@v-1"] {
        fake.insert(&[odd], &["custos-key/odd"], State::Active);
    }
    assert!(matches!(
        p.describe(&key("name/odd")).await,
        Err(KeyError::NotFound { .. })
    ));
    // A customer's key of 128 bits: never wrapped under.
    let weak = fake.insert(&["weak"], &[], State::Active);
    fake.set_bits(&weak, 128);
    let e = p.generate_data_key(&key(&weak), &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
    assert!(e.to_string().contains("AES-256"), "{e}");
}

/// An envelope naming an object outside the key is refused before any
/// Decrypt, and the name is quoted (it comes from the store).
#[tokio::test]
async fn an_envelope_naming_a_foreign_object_is_refused_before_decrypt() {
    let (p, fake) = provider(Behaviour::default());
    let k = key("name/mine");
    p.create_key(&k).await.unwrap();
    let other = key("name/other");
    p.create_key(&other).await.unwrap();
    let (_, w) = p.generate_data_key(&other, &ctx()).await.unwrap();
    let mut moved = w.clone();
    moved.key_id = k.to_string();
    fake.clear_log();
    let e = p.unwrap(&k, &moved, &ctx()).await.unwrap_err();
    assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
    assert!(!fake.log().contains(&"Decrypt".to_owned()));
}

// --- Pure functions ----------------------------------------------------------

#[test]
fn names_classify_versions_and_tombstones() {
    let n = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(classify("a", &n(&["a", "a@v3"])), ObjectKind::Version(3));
    assert_eq!(classify("a", &n(&["a@v3"])), ObjectKind::Version(3));
    assert_eq!(
        classify("a", &n(&["a", "a@destroyed@17"])),
        ObjectKind::Tombstone(17)
    );
    assert_eq!(classify("a", &n(&["a"])), ObjectKind::Foreign);
    assert_eq!(classify("a", &n(&["a", "ab@v2"])), ObjectKind::Foreign);
    assert_eq!(classify("a", &n(&["a", "a@vx"])), ObjectKind::Foreign);
    assert_eq!(classify("a", &n(&["a@v+3"])), ObjectKind::Foreign);
    assert_eq!(classify("a", &n(&["a@v03"])), ObjectKind::Foreign);
    assert_eq!(classify("a", &n(&["a@destroyed@-1"])), ObjectKind::Foreign);
}

fn family(versions: &[(u32, State)], tombstone: Option<i64>) -> Family {
    Family {
        versions: versions
            .iter()
            .map(|&(v, state)| {
                let obj = Object {
                    uid: format!("uid-{v}"),
                    state,
                    kind: ObjectKind::Version(v),
                    aes_256: true,
                    pinned: true,
                    check: None,
                    claims: ObjectKind::Version(v),
                    dead: false,
                };
                (v, obj)
            })
            .collect(),
        tombstone: tombstone.map(|at| (at, "uid-t".to_owned(), Some(State::Compromised))),
        ..Family::default()
    }
}

#[test]
fn a_half_destroyed_key_never_reads_as_destroyed_or_usable() {
    use State::{Active, Deactivated, Destroyed};
    let name = |f: &Family| f.state().map(|s| s.name());
    // Before any destruction: the newest version's state.
    assert_eq!(
        name(&family(&[(1, Active), (2, Active)], None)).unwrap(),
        "enabled"
    );
    assert_eq!(
        name(&family(&[(1, Deactivated)], None)).unwrap(),
        "disabled"
    );
    assert_eq!(family(&[], None).state(), None);
    // The newest destroyed (a server that keeps destroyed objects lists
    // it), an older one still Active: not destroyed.
    for f in [
        family(&[(1, Active), (2, Destroyed)], None),
        family(&[(1, Deactivated), (2, Destroyed)], Some(1_700_000_000)),
        family(&[(1, Active)], Some(1_700_000_000)),
    ] {
        assert_eq!(name(&f).unwrap(), "destroy_incomplete");
        assert!(!f.state().unwrap().is_usable());
    }
    // Every version gone or destroyed: destroyed, at the tombstone's time.
    let f = family(&[(1, Destroyed), (2, Destroyed)], Some(1_700_000_000));
    assert_eq!(
        f.state(),
        Some(KeyState::Destroyed {
            destroyed_at: time(1_700_000_000)
        })
    );
    assert_eq!(
        family(&[], Some(1_700_000_000)).state(),
        Some(KeyState::Destroyed {
            destroyed_at: time(1_700_000_000)
        })
    );
}

#[test]
fn states_map_onto_key_states() {
    assert_eq!(state_of(State::Active), KeyState::Enabled);
    assert_eq!(state_of(State::Deactivated), KeyState::Disabled);
    assert!(!state_of(State::PreActive).is_usable());
    assert!(!state_of(State::Compromised).is_usable());
    assert!(matches!(
        state_of(State::Destroyed),
        KeyState::Destroyed { .. }
    ));
    assert!(matches!(
        state_of(State::DestroyedCompromised),
        KeyState::Destroyed { .. }
    ));
}

// --- The spec's vectors (docs/FORMAT.md §3, KMIP) ------------------------------

const VECTORS_BEGIN: &str = "<!-- kmip-vectors:begin -->\n```json\n";
const VECTORS_END: &str = "```\n<!-- kmip-vectors:end -->";

/// The KMIP envelopes of the spec's fixed inputs, each server ciphertext
/// computed as the server would.
fn kmip_vectors() -> serde_json::Value {
    let seq = |start: u8| -> [u8; 32] { std::array::from_fn(|i| start + i as u8) };
    let cmk = seq(0xa0);
    let wk = SecretKey::from_bytes(seq(0xc0));
    let tdk = SecretKey::from_bytes(seq(0x00));
    let iv: [u8; 16] = std::array::from_fn(|i| 0x10 + i as u8);
    let nonce: [u8; 12] = std::array::from_fn(|i| 0x80 + i as u8);
    let uid = "42";
    let c = ctx();
    let v2 = |cipher: Cipher, e_wk: &[u8]| {
        let server = envelope::ServerWrap {
            cipher,
            uid,
            iv,
            wk_ct: e_wk,
        };
        let ct = envelope::seal(&server, &wk, &tdk, &c, nonce).unwrap();
        serde_json::json!({ "e_wk_hex": hex::encode(e_wk), "ciphertext_hex": hex::encode(ct) })
    };
    let v1_e_wk = fake::cbc_encrypt(&cmk, iv, wk.expose(), true);
    let v1 = envelope::tests::seal_v1(uid, iv, &v1_e_wk, &wk, &tdk, &c, nonce);
    serde_json::json!({
        "inputs": {
            "cmk": hex::encode(cmk), "uid": uid, "wk": hex::encode(wk.expose()),
            "iv": hex::encode(iv), "nonce": hex::encode(nonce), "tdk": hex::encode(tdk.expose()),
            "context_canonical_hex": hex::encode(c.canonical_bytes()),
        },
        "format_2_mode_1_cbc": v2(Cipher::Cbc, &fake::cbc_encrypt(&cmk, iv, wk.expose(), false)),
        "format_2_mode_2_ctr": v2(Cipher::Ctr, &fake::ctr(&cmk, iv, wk.expose())),
        "format_1": { "e_wk_hex": hex::encode(&v1_e_wk), "ciphertext_hex": hex::encode(v1) },
    })
}

/// The vectors in docs/FORMAT.md are what the code writes, and they open
/// to the TDK. `CUSTOS_UPDATE_VECTORS=1` rewrites the block.
#[test]
fn kmip_vectors_match_the_spec() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/FORMAT.md");
    let spec = std::fs::read_to_string(&path).unwrap();
    let start = spec.find(VECTORS_BEGIN).expect("KMIP vectors block") + VECTORS_BEGIN.len();
    let end = spec.find(VECTORS_END).expect("KMIP vectors end");
    let fresh = kmip_vectors();
    if std::env::var("CUSTOS_UPDATE_VECTORS").is_ok() {
        let block = serde_json::to_string_pretty(&fresh).unwrap() + "\n";
        std::fs::write(
            &path,
            format!("{}{}{}", &spec[..start], block, &spec[end..]),
        )
        .unwrap();
        return;
    }
    let doc: serde_json::Value = serde_json::from_str(&spec[start..end]).unwrap();
    assert_eq!(
        doc, fresh,
        "the KMIP vectors of docs/FORMAT.md differ from the code"
    );
    // Opening direction: each envelope gives the TDK back under the CMK.
    let cmk: [u8; 32] = std::array::from_fn(|i| 0xa0 + i as u8);
    for (name, cipher) in [
        ("format_2_mode_1_cbc", Cipher::Cbc),
        ("format_2_mode_2_ctr", Cipher::Ctr),
        ("format_1", Cipher::CbcPkcs5),
    ] {
        let ct = hex::decode(doc[name]["ciphertext_hex"].as_str().unwrap()).unwrap();
        let env = envelope::Envelope::parse(&ct).unwrap();
        assert_eq!(env.cipher, cipher);
        let wk = match cipher {
            Cipher::Ctr => fake::ctr(&cmk, env.iv, env.wk_ct),
            c => fake::cbc_decrypt(&cmk, env.iv, env.wk_ct, c == Cipher::CbcPkcs5).unwrap(),
        };
        let tdk = env.open(&wk, &ctx()).unwrap();
        assert_eq!(
            tdk.expose(),
            &std::array::from_fn::<u8, 32, _>(|i| i as u8),
            "{name}"
        );
    }
}

/// A key manager whose answers a test rewrites (all but those to custos's
/// key check value, an Encrypt of one zero block, so that keys are created).
struct Rewriting<F> {
    fake: Arc<FakeKmip>,
    rewrite: F,
}

#[async_trait]
impl<F> Link for Rewriting<F>
where
    F: Fn(Operation, Response) -> Response + Send + Sync,
{
    async fn call(&self, req: Request) -> Result<Response, WireError> {
        let op = req.operation();
        let check_value = matches!(&req, Request::Crypt { decrypt: false, data, .. } if data.as_slice() == [0; 16]);
        let answer = self.fake.call(req).await;
        match check_value {
            true => answer,
            false => answer.map(|r| (self.rewrite)(op, r)),
        }
    }
}

fn rewriting<F>(rewrite: F) -> (KmipProvider, Arc<FakeKmip>)
where
    F: Fn(Operation, Response) -> Response + Send + Sync + 'static,
{
    let fake = Arc::new(FakeKmip::new(Behaviour::default()));
    let link = Rewriting {
        fake: fake.clone(),
        rewrite,
    };
    (
        KmipProvider::with_link("fake:5696".into(), Box::new(link)),
        fake,
    )
}

/// An Encrypt answered for another key than the one asked for, or one that
/// returns the wrapping key unchanged, leaves no envelope.
#[tokio::test]
async fn an_encrypt_that_did_not_encrypt_under_the_key_is_refused() {
    let (p, _) = rewriting(|op, r| match (op, r) {
        (Operation::Encrypt, Response::Data { data, iv, .. }) => Response::Data {
            uid: "someone-elses-key".into(),
            data,
            iv,
        },
        (_, r) => r,
    });
    let k = key("name/moved");
    p.create_key(&k).await.unwrap();
    let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
    assert!(e.to_string().contains("someone-elses-key"), "{e}");

    // A pass-through "Encrypt", answering its input.
    struct Echo(Arc<FakeKmip>);
    #[async_trait]
    impl Link for Echo {
        async fn call(&self, req: Request) -> Result<Response, WireError> {
            match req {
                Request::Crypt {
                    decrypt: false,
                    uid,
                    data,
                    ..
                } => Ok(Response::Data {
                    uid,
                    data,
                    iv: None,
                }),
                other => self.0.call(other).await,
            }
        }
    }
    let fake = Arc::new(FakeKmip::new(Behaviour::default()));
    let p = KmipProvider::with_link("fake:5696".into(), Box::new(Echo(fake.clone())));
    let k = key("name/plain");
    p.create_key(&k).await.unwrap();
    let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
    assert!(e.to_string().contains("unchanged"), "{e}");
}

/// An Encrypt whose answer is not what was asked for leaves no envelope:
/// another IV than custos sent, another length, or a ciphertext the same
/// object does not decrypt back to the wrapping key.
#[tokio::test]
async fn an_encrypt_answer_that_does_not_check_out_is_refused() {
    type Rewrite = fn(Operation, Response) -> Response;
    let cases: [(&str, Rewrite); 3] = [
        ("IV", |op, r| match (op, r) {
            (Operation::Encrypt, Response::Data { uid, data, .. }) => Response::Data {
                uid,
                data,
                iv: Some(vec![0; 16]),
            },
            (_, r) => r,
        }),
        ("returned 48 bytes", |op, r| match (op, r) {
            (Operation::Encrypt, Response::Data { uid, mut data, iv }) => {
                data.extend_from_slice(&[0; 16]);
                Response::Data { uid, data, iv }
            }
            (_, r) => r,
        }),
        ("does not give back", |op, r| match (op, r) {
            (Operation::Encrypt, Response::Data { uid, iv, .. }) => Response::Data {
                uid,
                data: Zeroizing::new(crate::util::random_bytes::<32>().to_vec()),
                iv,
            },
            (_, r) => r,
        }),
    ];
    for (what, rewrite) in cases {
        let (p, _) = rewriting(rewrite);
        let k = key("name/odd");
        p.create_key(&k).await.unwrap();
        let e = p.generate_data_key(&k, &ctx()).await.unwrap_err();
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
}

/// GetAttributes answered for another object than the one asked for is
/// refused: one object must not pass for another.
#[tokio::test]
async fn attributes_of_another_object_are_refused() {
    let (p, _) = rewriting(|op, r| match (op, r) {
        (Operation::GetAttributes, Response::Attributes(mut a)) => {
            a.uid = "999".into();
            Response::Attributes(a)
        }
        (_, r) => r,
    });
    let e = p.create_key(&key("name/a")).await.unwrap_err();
    assert!(e.to_string().contains("answered for object \"999\""), "{e}");
}

/// A server that answers fewer identifiers per Locate than asked for (its
/// own page size) is read to the end, with and without Located Items.
#[tokio::test]
async fn a_server_with_smaller_pages_is_read_to_the_end() {
    for located_items in [false, true] {
        let (p, fake) = provider(Behaviour {
            page_cap: 2,
            located_items,
            ..Behaviour::default()
        });
        let k = key("name/paged");
        p.create_key(&k).await.unwrap();
        for _ in 0..5 {
            p.rotate(&k).await.unwrap();
        }
        // A new provider (no record): only the Locate can find them.
        let q = KmipProvider::with_link("fake:5696".into(), Box::new(fake.clone()));
        let newest = fake
            .objects()
            .into_iter()
            .find(|o| o.names == ["paged@v6"])
            .unwrap();
        assert_eq!(
            q.describe(&k).await.unwrap().current_version,
            Some(newest.uid),
            "located_items {located_items}"
        );
        let d = q.destroy(&k, 7).await.unwrap();
        assert_eq!(d.objects.len(), 6);
    }
}

/// Junk objects in a key's group make a family read fail with an error
/// naming the group, after a bounded number of calls.
#[tokio::test]
async fn junk_in_the_group_fails_with_the_groups_name() {
    let (mut p, fake) = provider(Behaviour::default());
    p.locate_page = 256;
    for i in 0..=MAX_OBJECTS {
        fake.insert(
            &[&format!("junk{i}")],
            &["custos-key/flooded"],
            State::Active,
        );
    }
    fake.clear_log();
    let e = p.describe(&key("name/flooded")).await.unwrap_err();
    assert!(e.to_string().contains("custos-key/flooded"), "{e}");
    assert!(!fake.log().contains(&"GetAttributes".to_owned()));
}

/// A shred interrupted after its tombstone was created and recorded, before
/// it was revoked, ends on a re-run in the state of one clean run: one
/// tombstone, revoked as compromised, every version destroyed.
#[tokio::test]
async fn a_shred_run_again_converges_on_a_clean_runs_state() {
    struct FailFirstRevokeOfTombstone {
        fake: Arc<FakeKmip>,
        failed: Mutex<bool>,
    }
    #[async_trait]
    impl Link for Arc<FailFirstRevokeOfTombstone> {
        async fn call(&self, req: Request) -> Result<Response, WireError> {
            if let Request::Revoke {
                reason: RevocationReasonCode::KeyCompromise,
                ..
            } = &req
                && !std::mem::replace(&mut *self.failed.lock().unwrap(), true)
            {
                return Err(WireError::Io("connection reset".into()));
            }
            self.fake.call(req).await
        }
    }
    let fake = Arc::new(FakeKmip::new(Behaviour::default()));
    let link = Arc::new(FailFirstRevokeOfTombstone {
        fake: fake.clone(),
        failed: Mutex::new(false),
    });
    let p = KmipProvider::with_link("fake:5696".into(), Box::new(link));
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    p.rotate(&k).await.unwrap();
    assert!(p.destroy(&k, 7).await.is_err());
    let d = p.destroy(&k, 7).await.unwrap();
    assert_eq!(d.objects.len(), 2);
    let left = in_group(&fake, "custos-key/acme");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].state, State::Compromised);
    assert_destroyed_with_a_time(&p, &k).await;
}

/// A `kmip:<uid>` key's object deleted behind custos, its identifier given
/// to another key's new version (PyKMIP reuses the top identifier): custos
/// created that version, so the identifier is dead for the first key, and
/// its shred neither destroys the other key's version nor certifies.
#[tokio::test]
async fn a_uid_keys_shred_leaves_another_keys_version_under_its_reused_identifier() {
    let (p, fake) = provider(Behaviour {
        reuse_ids: true,
        ..Behaviour::default()
    });
    let t2 = key("name/t2");
    p.create_key(&t2).await.unwrap();
    let u = fake.insert(&[], &[], State::Active);
    let ku = key(&u);
    p.generate_data_key(&ku, &ctx()).await.unwrap();
    fake.remove(&u);
    p.rotate(&t2).await.unwrap();
    assert_eq!(p.current(&t2).await.unwrap().uid, u);
    p.disable(&t2).await.unwrap();
    let e = p.destroy(&ku, 7).await.unwrap_err();
    assert!(matches!(e, KeyError::NotFound { .. }), "{e}");
    let o = fake.objects().into_iter().find(|o| o.uid == u).unwrap();
    assert_eq!(o.state, State::Deactivated, "t2's version is untouched");
    assert!(p.describe(&t2).await.is_ok());
}

/// Another key's object under an identifier a key recorded (its version
/// deleted behind custos, the identifier reused for the other key's
/// version, then disabled) neither makes the first key read as disabled
/// nor stops its shred, and is left alone by it.
#[tokio::test]
async fn another_keys_object_under_a_reused_identifier_neither_disables_nor_wedges_a_shred() {
    let (p, fake) = provider(Behaviour {
        reuse_ids: true,
        ..Behaviour::default()
    });
    let a = key("name/a");
    p.create_key(&a).await.unwrap();
    let v1 = p.current(&a).await.unwrap().uid;
    p.rotate(&a).await.unwrap();
    let v2 = p.current(&a).await.unwrap().uid;
    fake.remove(&v2);
    let b = key("name/b");
    p.create_key(&b).await.unwrap();
    assert_eq!(p.current(&b).await.unwrap().uid, v2);
    p.disable(&b).await.unwrap();
    let info = p.describe(&a).await.unwrap();
    assert!(matches!(info.state, KeyState::Enabled), "{info:?}");
    for _ in 0..2 {
        let d = p.destroy(&a, 7).await.unwrap();
        assert_eq!(d.objects, vec![v1.clone()]);
    }
    let o = fake.objects().into_iter().find(|o| o.uid == v2).unwrap();
    assert_eq!(o.state, State::Deactivated, "b's version is untouched");
}

/// `[kmip] server` resolving to another key manager while a process runs
/// (its verdict on the server cached): a rotation asks the server afresh
/// before its Create, so no version is made there, and the key stays whole
/// on its own server.
#[tokio::test]
async fn a_rotation_after_a_server_switch_creates_nothing_on_the_other_server() {
    struct Switch(Mutex<Arc<FakeKmip>>);
    #[async_trait::async_trait]
    impl Link for Arc<Switch> {
        async fn call(&self, req: Request) -> Result<Response, WireError> {
            let to = self.0.lock().unwrap().clone();
            to.call(req).await
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let right = Arc::new(FakeKmip::new(Behaviour::default()));
    let wrong = Arc::new(FakeKmip::new(Behaviour::default()));
    for n in 0..4 {
        wrong.insert(&[&format!("payroll-{n}")], &[], State::Active);
    }
    let link = Arc::new(Switch(Mutex::new(right.clone())));
    let p = KmipProvider::with_link("fake:5696".into(), Box::new(link.clone()))
        .with_object_record(dir.path().join("kmip-objects.json"));
    let k = key("name/acme");
    p.create_key(&k).await.unwrap();
    let (dk, w) = p.generate_data_key(&k, &ctx()).await.unwrap();
    *link.0.lock().unwrap() = wrong.clone();
    let e = p.rotate(&k).await.unwrap_err();
    assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
    assert_eq!(wrong.objects().len(), 4, "{:?}", wrong.objects());
    *link.0.lock().unwrap() = right.clone();
    assert_eq!(p.unwrap(&k, &w, &ctx()).await.unwrap(), dk);
    p.rotate(&k).await.unwrap();
}

/// custos's tombstone deleted behind it and its identifier given to another
/// key's new version: a shred of the first key run again neither revokes
/// that version as its tombstone nor takes it for one; it makes a new
/// tombstone with the destruction's first time.
#[tokio::test]
async fn a_tombstone_identifier_reused_by_another_key_is_never_revoked() {
    let (p, fake, refused) = denying(
        Behaviour {
            reuse_ids: true,
            ..Behaviour::default()
        },
        |req| match req {
            Request::Destroy(uid) => Some(uid),
            _ => None,
        },
    );
    let a = key("name/a");
    p.create_key(&a).await.unwrap();
    let v1 = p.describe(&a).await.unwrap().current_version.unwrap();
    // The first shred stops at its Destroy, after leaving its tombstone.
    *refused.lock().unwrap() = v1.clone();
    p.destroy(&a, 7).await.unwrap_err();
    let tomb = in_group(&fake, "custos-key/a")
        .into_iter()
        .find(|o| o.uid != v1)
        .unwrap()
        .uid;
    fake.remove(&tomb);
    let b = key("name/b");
    p.create_key(&b).await.unwrap();
    assert_eq!(p.current(&b).await.unwrap().uid, tomb);
    refused.lock().unwrap().clear();
    let d = p.destroy(&a, 7).await.unwrap();
    assert_eq!(d.objects, vec![v1]);
    let o = fake.objects().into_iter().find(|o| o.uid == tomb).unwrap();
    assert_eq!(o.state, State::Active, "b's version is untouched");
    p.generate_data_key(&b, &ctx()).await.unwrap();
}

/// An identifier a shredded key once held, given by the server to the
/// customer's new key: that key (`kmip:<uid>`) is met and adopted as any
/// other, not refused as another key's object.
#[tokio::test]
async fn a_new_uid_key_under_a_shredded_keys_identifier_is_adopted() {
    let (p, fake) = provider(Behaviour {
        reuse_ids: true,
        ..Behaviour::default()
    });
    let old = key("name/old");
    p.create_key(&old).await.unwrap();
    let freed = p.current(&old).await.unwrap().uid;
    p.destroy(&old, 7).await.unwrap();
    // The tombstone deleted too (out of band): the version's identifier is
    // the top free one, and the customer's new key gets it.
    for o in in_group(&fake, "custos-key/old") {
        fake.remove(&o.uid);
    }
    let u = fake.insert(&[], &[], State::Active);
    assert_eq!(u, freed);
    let ku = key(&u);
    let (dk, w) = p.generate_data_key(&ku, &ctx()).await.unwrap();
    assert_eq!(p.unwrap(&ku, &w, &ctx()).await.unwrap(), dk);
}
